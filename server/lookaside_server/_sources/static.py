"""An endpoint source read from a YAML/JSON file, polled for changes (for local use, demos and tests).

Format: a mapping ``"namespace/service"`` -> list of ``{ip, port, port_name?, zone?, for_zones?, ready?,
serving?, terminating?}``. A broken edit keeps the last good contents; removed targets publish None.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lookaside_server._core.model import BackendEndpoint, Endpoints, Target
from lookaside_server._core.names import namespace_problem, port_name_problem, service_problem
from lookaside_server._sources.base import EndpointSource, Publish, TargetNotFound, TooManyTargets

if TYPE_CHECKING:
    from lookaside_server._config import StaticFileConfig

log = logging.getLogger(__name__)

Contents = dict[Target, Endpoints]
_FIELDS = {"ip", "port", "port_name", "zone", "for_zones", "ready", "serving", "terminating"}
#: Re-read the file every this many polls even if stat() looks unchanged (same-size edits within a tick).
_FORCED_CHECK_EVERY = 10


class StaticFileError(ValueError):
    """The static endpoint file cannot be used (unreadable, not YAML, or not in the expected shape)."""


def parse_static(text: str | bytes) -> Contents:
    """Parse and validate the static file contents; raise :class:`StaticFileError` saying what is wrong."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise StaticFileError(f"not valid YAML/JSON: {e}") from e
    if data is None:
        raise StaticFileError("file is empty (write {} for no targets)")
    if not isinstance(data, dict):
        raise StaticFileError("top level must be a mapping of 'namespace/service' to endpoint lists, "
                              f"not {type(data).__name__}")
    contents: Contents = {}
    for key, items in data.items():
        target = _parse_target(key)
        if not isinstance(items, list):
            raise StaticFileError(f"{target}: endpoints must be a list, not {type(items).__name__}")
        contents[target] = tuple(_parse_endpoint(target, i, item) for i, item in enumerate(items))
    return contents


def _parse_target(key: object) -> Target:
    if not isinstance(key, str) or key.count("/") != 1:
        raise StaticFileError(f"key {key!r} must be 'namespace/service'")
    namespace, service = key.split("/")
    for what, problem in (("namespace", namespace_problem(namespace)), ("service", service_problem(service))):
        if problem:
            raise StaticFileError(f"key {key!r}: {what} {problem}")
    return Target(service, namespace)


def _parse_endpoint(target: Target, index: int, item: object) -> BackendEndpoint:
    where = f"{target} endpoint #{index}"
    if not isinstance(item, dict):
        raise StaticFileError(f"{where}: must be a mapping with ip and port")
    unknown = set(item) - _FIELDS
    if unknown:
        raise StaticFileError(f"{where}: unknown field(s) {sorted(map(str, unknown))}")
    ip = item.get("ip")
    if not isinstance(ip, str):
        raise StaticFileError(f"{where}: ip must be a string")
    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError as e:
        raise StaticFileError(f"{where}: {e}") from e
    port = item.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise StaticFileError(f"{where}: port must be an integer in 1..65535, not {port!r}")
    port_name = _opt_str(item, "port_name", where)
    if port_name and (problem := port_name_problem(port_name)):
        raise StaticFileError(f"{where}: port_name {port_name!r} {problem}")
    zone = _opt_str(item, "zone", where)
    for_zones = item.get("for_zones", [])
    if not isinstance(for_zones, list) or not all(isinstance(z, str) for z in for_zones):
        raise StaticFileError(f"{where}: for_zones must be a list of strings")
    flags = {name: _opt_bool(item, name, default, where) for name, default in
             (("ready", True), ("serving", None), ("terminating", False))}
    ready, terminating = bool(flags["ready"]), bool(flags["terminating"])
    serving = ready if flags["serving"] is None else bool(flags["serving"])
    if ready and terminating:
        raise StaticFileError(f"{where}: an endpoint cannot be both ready and terminating")
    return BackendEndpoint(ip=ip, port=port, port_name=port_name, zone=zone, for_zones=tuple(for_zones),
                           ready=ready, serving=serving, terminating=terminating)


def _opt_str(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name, "")
    if not isinstance(value, str):
        raise StaticFileError(f"{where}: {name} must be a string, not {value!r}")
    return value


def _opt_bool(item: dict[str, Any], name: str, default: bool | None, where: str) -> bool | None:
    value = item.get(name, default)
    if value is not None and not isinstance(value, bool):
        raise StaticFileError(f"{where}: {name} must be true or false, not {value!r}")
    return value


class StaticFileSource(EndpointSource):
    """Serves endpoints from a YAML/JSON file, re-read when it changes (polled every ``poll_interval`` s).

    Change detection compares stat() (mtime_ns, size, inode, device; following symlinks, so ConfigMap
    symlink swaps and editors replacing the file are seen), then a content hash before re-parsing.
    """

    def __init__(self, path: str | os.PathLike[str], poll_interval: float = 1.0,
                 max_targets: int | None = None) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        #: Most targets subscribed at once (None: no limit); more raise TooManyTargets.
        self.max_targets = max_targets
        self._publish: Publish | None = None
        self._contents: Contents = {}
        self._subscribed: set[Target] = set()
        self._stat: tuple[int, int, int, int] | None = None
        self._digest: bytes | None = None
        self._polls = 0
        self._task: asyncio.Task[None] | None = None
        self._missing_logged = False
        self._check_lock = asyncio.Lock()

    @classmethod
    def from_config(cls, config: StaticFileConfig) -> StaticFileSource:
        """The source a :class:`~lookaside_server._config.StaticFileConfig` describes."""
        return cls(config.path, poll_interval=config.poll_interval, max_targets=config.max_targets)

    async def start(self, publish: Publish) -> None:
        """Load the file (raising if it is missing or invalid) and start polling it."""
        self._publish = publish
        try:
            loaded = await asyncio.to_thread(self._read_if_changed, True)
        except OSError as e:
            raise StaticFileError(f"cannot read static endpoint file {self.path}: {e}") from e
        assert loaded is not None
        try:
            self._contents = parse_static(loaded)
        except StaticFileError as e:
            raise StaticFileError(f"static endpoint file {self.path}: {e}") from e
        log.info("static endpoint file %s: %d target(s)", self.path, len(self._contents))
        self._task = asyncio.create_task(self._poll_loop(), name=f"poll {self.path}")

    async def subscribe(self, target: Target) -> None:
        """Track ``target`` if the file has it (else raise :class:`TargetNotFound`) and publish it."""
        endpoints = self._contents.get(target)
        if endpoints is None:
            raise TargetNotFound(target)
        if (self.max_targets is not None and target not in self._subscribed
                and len(self._subscribed) >= self.max_targets):
            raise TooManyTargets(target, self.max_targets)
        self._subscribed.add(target)
        assert self._publish is not None
        self._publish(target, endpoints)

    async def unsubscribe(self, target: Target) -> None:
        """Stop publishing ``target``."""
        self._subscribed.discard(target)

    async def stop(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._publish = None

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.check_now()

    async def check_now(self) -> bool:
        """Re-read the file if it changed and publish the differences; True if new contents were applied."""
        async with self._check_lock:
            return await self._check()

    async def _check(self) -> bool:
        self._polls += 1
        try:
            data = await asyncio.to_thread(self._read_if_changed, self._polls % _FORCED_CHECK_EVERY == 0)
        except OSError as e:
            if not self._missing_logged:
                log.warning("static endpoint file %s unreadable, keeping the last good set: %s", self.path, e)
                self._missing_logged = True
            return False
        self._missing_logged = False
        if data is None:
            return False
        try:
            contents = parse_static(data)
        except StaticFileError as e:
            log.warning("static endpoint file %s: broken edit ignored, keeping the last good set: %s",
                        self.path, e)
            return False
        self._apply(contents)
        return True

    def _read_if_changed(self, force: bool) -> bytes | None:
        """Runs in a worker thread: return the file bytes if stat or content changed since last time."""
        st = os.stat(self.path)
        sig = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        if sig == self._stat and not force:
            return None
        data = self.path.read_bytes()
        digest = hashlib.sha256(data).digest()
        self._stat = sig
        if digest == self._digest:
            return None
        self._digest = digest
        return data

    def _apply(self, contents: Contents) -> None:
        old, self._contents = self._contents, contents
        log.info("static endpoint file %s reloaded: %d target(s)", self.path, len(contents))
        if self._publish is None:
            return
        for target in sorted(self._subscribed, key=str):
            new = contents.get(target)
            if new != old.get(target):
                self._publish(target, new)
