"""An endpoint source read from a YAML/JSON file, re-read when it changes (for local use, demos and tests).

Format: a mapping ``"namespace/service"`` -> list of ``{ip, port, port_name?, service_port?, zone?,
for_zones?, ready?, serving?, terminating?}``; ``port`` is the number to dial, ``service_port`` the Service
port clients ask for by number (as a Service's ``port`` over its ``targetPort``; default: ``port``), the
same on every endpoint of one port name. A broken edit keeps the last good contents; removed targets
publish None.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lookaside_grpc.protocol import InvalidTarget, canonical_port
from lookaside_server._core.model import BackendEndpoint, Endpoints, Target
from lookaside_server._sources import _inotify
from lookaside_server._sources.base import EndpointSource, Publish, TargetNotFound, TooManyTargets

if TYPE_CHECKING:
    from lookaside_server._config import StaticFileConfig

log = logging.getLogger(__name__)

Contents = dict[Target, Endpoints]
_FIELDS = {"ip", "port", "port_name", "service_port", "zone", "for_zones", "ready", "serving", "terminating"}
#: Re-read the file every this many polls even if stat() looks unchanged (same-size edits within a tick).
_FORCED_CHECK_EVERY = 10


#: libyaml's safe loader when PyYAML was built with it (about 10x faster), else the pure-Python one.
_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class StaticFileError(ValueError):
    """The static endpoint file cannot be used (unreadable, not YAML, or not in the expected shape)."""


def parse_static(text: str | bytes) -> Contents:
    """Parse and validate the static file contents; raise :class:`StaticFileError` saying what is wrong."""
    try:
        # JSON (a subset of YAML) first: a 5,000-endpoint file parses in ms instead of seconds of pure-Python
        # YAML; then YAML with libyaml's loader where PyYAML has it.
        data = json.loads(text)
    except ValueError:
        try:
            data = yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as e:
            raise StaticFileError(f"not valid YAML/JSON: {e}") from e
    if data is None:
        raise StaticFileError("file is empty (write {} for no targets)")
    if not isinstance(data, dict):
        raise StaticFileError(
            f"top level must be a mapping of 'namespace/service' to endpoint lists, not {type(data).__name__}"
        )
    contents: Contents = {}
    for key, items in data.items():
        target = _parse_target(key)
        if not isinstance(items, list):
            raise StaticFileError(f"{target}: endpoints must be a list, not {type(items).__name__}")
        contents[target] = tuple(_parse_endpoint(target, i, item) for i, item in enumerate(items))
        _check_service_ports(target, contents[target])
    return contents


def _check_service_ports(target: Target, endpoints: Endpoints) -> None:
    """As in a Service: a port name has one Service port number (or none), a number one port name."""
    by_name: dict[str, set[int]] = {}
    for e in endpoints:
        by_name.setdefault(e.port_name, set()).add(e.service_port)
    by_number: dict[int, str] = {}
    for name, numbers in by_name.items():
        label = repr(name) if name else "the unnamed port"
        if len(numbers) > 1:
            listed = ", ".join(str(n) if n else "none" for n in sorted(numbers))
            raise StaticFileError(
                f"{target}: {label} has different service_port values ({listed}); give every endpoint of "
                "a port the same one"
            )
        (number,) = numbers
        if number and by_number.setdefault(number, name) != name:
            other = by_number[number]
            raise StaticFileError(
                f"{target}: service_port {number} is given to {repr(other) if other else 'the unnamed port'}"
                f" and {label}; one Service port number names one port"
            )


def _parse_target(key: object) -> Target:
    if not isinstance(key, str) or key.count("/") != 1:
        raise StaticFileError(f"key {key!r} must be 'namespace/service'")
    namespace, service = key.split("/")
    try:
        return Target(service, namespace)
    except InvalidTarget as e:
        raise StaticFileError(f"key {key!r}: {e}") from None


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
    if port_name:
        try:
            named = canonical_port(port_name) == port_name and not port_name.isdigit()
        except InvalidTarget as e:
            raise StaticFileError(f"{where}: port_name: {e}") from None
        if not named:
            raise StaticFileError(
                f"{where}: port_name {port_name!r} must contain a letter (digits alone "
                "select a port by number)"
            )
    service_port = item.get("service_port", 0)
    if "service_port" in item and (
        not isinstance(service_port, int) or isinstance(service_port, bool) or not 1 <= service_port <= 65535
    ):
        raise StaticFileError(f"{where}: service_port must be an integer in 1..65535, not {service_port!r}")
    zone = _opt_str(item, "zone", where)
    for_zones = item.get("for_zones", [])
    if not isinstance(for_zones, list) or not all(isinstance(z, str) for z in for_zones):
        raise StaticFileError(f"{where}: for_zones must be a list of strings")
    flags = {
        name: _opt_bool(item, name, default, where)
        for name, default in (("ready", True), ("serving", None), ("terminating", False))
    }
    ready, terminating = bool(flags["ready"]), bool(flags["terminating"])
    serving = ready if flags["serving"] is None else bool(flags["serving"])
    if ready and terminating:
        raise StaticFileError(f"{where}: an endpoint cannot be both ready and terminating")
    return BackendEndpoint(
        ip=ip,
        port=port,
        port_name=port_name,
        zone=zone,
        for_zones=tuple(for_zones),
        ready=ready,
        serving=serving,
        terminating=terminating,
        service_port=service_port,
    )


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
    """Serves endpoints from a YAML/JSON file, re-read when it changes.

    Changes are noticed through inotify on the file's directory where the platform has it (so editors'
    rename-over and ConfigMap symlink swaps are seen at once), and by looking at the file every
    ``poll_interval`` seconds (the only way without inotify; a safety net with it). A changed file is
    published only once it is stable: the same content on two reads ``settle`` seconds apart, and (with
    inotify) no writer holding it open since its last change -- a file rewritten in place is never published
    half-written. Anything going wrong while reading or parsing (a broken edit, a missing file, a
    ``RecursionError`` from absurd nesting) keeps the last good set and is logged; the reloader itself is
    supervised and restarted if it ever ends.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        poll_interval: float = 1.0,
        max_targets: int | None = None,
        *,
        notify: bool = True,
        settle: float = 0.02,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        if max_targets is not None and max_targets < 1:
            raise ValueError("max_targets must be at least 1 (or None for no limit)")
        self.path = Path(path)
        self.poll_interval = poll_interval
        #: Most targets subscribed at once that the file has (None: no limit); more raise TooManyTargets.
        #: A subscribed target removed from the file frees its slot.
        self.max_targets = max_targets
        #: Seconds between the two reads that must agree before a change is published.
        self.settle = settle
        self._want_notify = notify
        self._publish: Publish | None = None
        self._contents: Contents = {}
        #: Subscribed targets the file has (they count against ``max_targets``).
        self._subscribed: set[Target] = set()
        #: Subscribed targets the file no longer has (published None; published again if they come back).
        self._gone: set[Target] = set()
        self._stat: tuple[int, int, int, int] | None = None
        #: Digest of the last content handled (applied or refused): the same bytes are not parsed again.
        self._seen: bytes | None = None
        self._polls = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._missing_logged = False
        self._check_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._watcher: _inotify.DirectoryWatcher | None = None
        #: Directory -> (file name in it whose events matter, also names starting with "..": ConfigMap swaps).
        self._names: dict[str, tuple[str, bool]] = {}
        #: inotify saw the file modified and not yet closed by its writer.
        self._writing = False
        #: How many times new contents were applied; failed reads/parses and reloader restarts.
        self.reloads = 0
        self.reload_errors = 0
        self.reloader_restarts = 0

    @property
    def description(self) -> str:
        """The source in an operator's words, for the status views: ``static file endpoints.yaml``."""
        return f"static file {self.path}"

    @classmethod
    def from_config(cls, config: StaticFileConfig) -> StaticFileSource:
        """The source a :class:`~lookaside_server._config.StaticFileConfig` describes."""
        return cls(
            config.path,
            poll_interval=config.poll_interval,
            max_targets=config.max_targets,
            notify=config.notify,
        )

    @property
    def notifying(self) -> bool:
        """Whether changes are noticed through file-system notification (else only by polling)."""
        return self._watcher is not None

    async def start(self, publish: Publish) -> None:
        """Load the file (raising StaticFileError if it is missing or invalid) and start watching it."""
        self._publish = publish
        self._stopping = False
        self._start_notify()
        try:
            try:
                data = await self._stable_read(await asyncio.to_thread(self._read))
            except OSError as e:
                raise StaticFileError(f"cannot read static endpoint file {self.path}: {e}") from e
            if data is None:
                raise StaticFileError(f"static endpoint file {self.path} kept changing: no stable content")
            try:
                self._contents = await asyncio.to_thread(parse_static, data)
            except StaticFileError as e:
                raise StaticFileError(f"static endpoint file {self.path}: {e}") from e
            except Exception as e:  # noqa: BLE001 - e.g. RecursionError from absurd nesting
                raise StaticFileError(
                    f"static endpoint file {self.path}: cannot be parsed ({type(e).__name__})"
                ) from e
        except BaseException:
            self._stop_notify()
            raise
        self._seen = hashlib.sha256(data).digest()
        log.info(
            "static endpoint file %s: %d target(s), changes noticed by %s",
            self.path,
            len(self._contents),
            "inotify" if self.notifying else f"polling every {self.poll_interval:g} s",
        )
        self._start_reloader()

    # --- subscriptions ----------------------------------------------------------------------------------

    async def subscribe(self, target: Target) -> None:
        """Track ``target`` if the file has it (else raise :class:`TargetNotFound`) and publish it."""
        endpoints = self._contents.get(target)
        if endpoints is None:
            raise TargetNotFound(target)
        if target not in self._subscribed:
            if self.max_targets is not None and len(self._subscribed) >= self.max_targets:
                raise TooManyTargets(target, self.max_targets)
            self._subscribed.add(target)
            self._gone.discard(target)
        assert self._publish is not None
        self._publish(target, endpoints)

    async def unsubscribe(self, target: Target) -> None:
        """Stop publishing ``target``."""
        self._subscribed.discard(target)
        self._gone.discard(target)

    @property
    def subscribed(self) -> frozenset[Target]:
        """The subscribed targets the file has (the ones counted against ``max_targets``)."""
        return frozenset(self._subscribed)

    # --- lifecycle --------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop watching; never raises because of the reloader."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._stop_notify()
        self._publish = None

    def _start_reloader(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"reload {self.path}")
        self._task.add_done_callback(self._reloader_ended)

    def _reloader_ended(self, task: asyncio.Task[None]) -> None:
        """Supervision: the reloader only ends on stop(); anything else is logged and it is restarted."""
        if self._stopping or task is not self._task:
            return
        exc = None if task.cancelled() else task.exception()
        self.reloader_restarts += 1
        log.error(
            "static endpoint file %s: reloader ended unexpectedly (%s); restarting it",
            self.path,
            "cancelled" if exc is None else f"{type(exc).__name__}: {exc}",
        )
        self._start_reloader()

    async def _run(self) -> None:
        while True:
            try:
                woken = await self._wait_for_change()
                await self._locked_check(force=woken)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the reloader must never die
                self.reload_errors += 1
                log.exception("static endpoint file %s: reload failed, keeping the last good set", self.path)
                await asyncio.sleep(min(self.poll_interval, 1.0))

    async def _wait_for_change(self) -> bool:
        """Wait for a file-system event (True) or the poll interval (False)."""
        try:
            await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        except TimeoutError:
            return False
        return True

    # --- change notification ----------------------------------------------------------------------------

    def _start_notify(self) -> None:
        if not self._want_notify or not _inotify.available():
            return
        try:
            self._watcher = _inotify.DirectoryWatcher(asyncio.get_running_loop(), self._on_event)
        except OSError as e:
            log.info(
                "static endpoint file %s: no inotify (%s), polling every %g s",
                self.path,
                e,
                self.poll_interval,
            )
            return
        self._update_watches()

    def _stop_notify(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._names.clear()

    def _update_watches(self) -> None:
        """Watch the directory holding the path (renames over it, ConfigMap ``..data`` swaps) and the one
        holding the file it resolves to (in-place writes through a symlink)."""
        if self._watcher is None:
            return
        link = os.path.abspath(self.path)
        real = os.path.realpath(link)
        names = {os.path.dirname(link): (os.path.basename(link), True)}
        names.setdefault(os.path.dirname(real), (os.path.basename(real), False))
        for directory in self._watcher.directories - set(names):
            self._watcher.unwatch(directory)
        for directory in names:
            try:
                self._watcher.watch(directory)
            except OSError as e:
                log.debug("cannot watch %s (%s): polling covers it", directory, e)
        self._names = names

    def _on_event(self, directory: str | None, name: str, mask: int) -> None:
        if directory is None:  # queue overflow: events were lost
            self._writing = False
            self._wake.set()
            return
        wanted = self._names.get(directory)
        if wanted is None:
            return
        file_name, swaps = wanted
        if name == file_name:
            if mask & (_inotify.IN_MODIFY | _inotify.IN_CREATE):
                self._writing = True
            elif mask & (
                _inotify.IN_CLOSE_WRITE | _inotify.IN_MOVED_TO | _inotify.IN_DELETE | _inotify.IN_MOVED_FROM
            ):
                self._writing = False
        elif not (swaps and name.startswith("..")) and not mask & (
            _inotify.IN_DELETE_SELF | _inotify.IN_MOVE_SELF
        ):
            return
        self._wake.set()

    # --- checks -----------------------------------------------------------------------------------------

    async def check_now(self) -> bool:
        """Re-read the file now and publish the differences; True if new contents were applied meanwhile
        (by this check, or by the reloader's check of the same change)."""
        before = self.reloads
        await self._locked_check(force=True)
        return self.reloads > before

    async def _locked_check(self, force: bool) -> None:
        async with self._check_lock:
            try:
                await self._check(force)
            finally:
                self._update_watches()

    async def _check(self, force: bool) -> None:
        self._wake.clear()
        self._polls += 1
        try:
            if not force and self._polls % _FORCED_CHECK_EVERY and not self._stat_changed():
                return
            data = await self._stable_read(await asyncio.to_thread(self._read))
        except OSError as e:
            if not self._missing_logged:
                log.warning("static endpoint file %s unreadable, keeping the last good set: %s", self.path, e)
                self._missing_logged = True
            return
        self._missing_logged = False
        if data is None:
            return
        digest = hashlib.sha256(data).digest()
        if digest == self._seen:
            return
        self._seen = digest
        try:
            contents = await asyncio.to_thread(parse_static, data)
        except StaticFileError as e:
            self.reload_errors += 1
            log.warning(
                "static endpoint file %s: broken edit ignored, keeping the last good set: %s", self.path, e
            )
            return
        except Exception as e:  # noqa: BLE001 - RecursionError, MemoryError...: never lose the last good set
            self.reload_errors += 1
            log.warning(
                "static endpoint file %s: cannot be parsed (%s: %s), keeping the last good set",
                self.path,
                type(e).__name__,
                str(e)[:200],
            )
            return
        self._apply(contents)

    def _stat_changed(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return True  # let the read report it
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev) != self._stat

    def _read(self) -> bytes:
        """Runs in a worker thread: the file's bytes (recording its stat)."""
        st = os.stat(self.path)
        data = self.path.read_bytes()
        self._stat = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        return data

    async def _stable_read(self, data: bytes) -> bytes | None:
        """``data`` once the file is stable: two reads ``settle`` seconds apart agree and no writer holds it
        open (a writer that never closes it is trusted after ``poll_interval`` seconds without change).
        Unchanged content (already seen) returns at once; None if the file never settles within a while."""
        if self._seen is not None and hashlib.sha256(data).digest() == self._seen:
            return data
        loop = asyncio.get_running_loop()
        stable_since = loop.time()
        deadline = stable_since + max(30.0, 3 * self.poll_interval)
        while True:
            await asyncio.sleep(self.settle)
            again = await asyncio.to_thread(self._read)
            now = loop.time()
            if again != data:
                data, stable_since = again, now
            elif not self._writing or now - stable_since >= self.poll_interval:
                return data
            if now > deadline:
                log.warning("static endpoint file %s keeps changing; keeping the last good set", self.path)
                return None

    def _apply(self, contents: Contents) -> None:
        old, self._contents = self._contents, contents
        self.reloads += 1
        log.info("static endpoint file %s reloaded: %d target(s)", self.path, len(contents))
        if self._publish is None:
            return
        for target in sorted(self._subscribed, key=str):
            new = contents.get(target)
            if new is None:  # removed from the file: publish it gone and free its slot
                self._subscribed.discard(target)
                self._gone.add(target)
                self._publish(target, None)
            elif new != old.get(target):
                self._publish(target, new)
        for target in sorted(self._gone & contents.keys(), key=str):  # back in the file
            if self.max_targets is not None and len(self._subscribed) >= self.max_targets:
                log.warning(
                    "static endpoint file %s: %s is back but all %d target slots are taken "
                    "(--max-targets); it stays unavailable until a slot frees",
                    self.path,
                    target,
                    self.max_targets,
                )
                continue
            self._gone.discard(target)
            self._subscribed.add(target)
            self._publish(target, contents[target])
