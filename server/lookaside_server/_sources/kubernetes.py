"""Kubernetes endpoint sources: EndpointSlices (discovery.k8s.io/v1) and the core/v1 Endpoints fallback.

Per target (namespace, Service), lazily on its first Resolve/Watch:

1. read the Service (404: NOT_FOUND) and LIST its objects (EndpointSlices labelled
   ``kubernetes.io/service-name=<service>``, or the Endpoints object of that name) in a worker thread,
   publish the merged state;
2. a dedicated thread WATCHes from the list's resourceVersion (``allowWatchBookmarks``, ``timeoutSeconds``
   so it wakes up regularly), applies every event to the objects kept by name and publishes the merged
   state through ``loop.call_soon_threadsafe``.

Robustness: the resourceVersion is tracked from every event and BOOKMARK; a 410 Gone (HTTP status or
ERROR event) clears and re-lists; any other failure (API down, 5xx, cut stream) backs off exponentially
with jitter and resumes the watch from the last resourceVersion, while the last known endpoints keep being
served; every ``resync_interval`` a full re-list republishes (the registry ignores unchanged states).
Nothing raised by the client leaves the watch thread.

The watch uses the official client's API functions exactly as ``kubernetes.watch.Watch.stream`` does
(``watch=True``, ``_preload_content=False``, one JSON event per line) but keeps the HTTP response in hand,
so that stopping a target shuts its socket down at once: threads are non-daemon and always joined on
:meth:`KubernetesSource.stop` (a thread still inside a request at interpreter exit can abort Python).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lookaside_server._core.model import Endpoints, Target
from lookaside_server._sources.base import (
    EndpointSource,
    Publish,
    SourceUnavailable,
    TargetNotFound,
    TooManyTargets,
)
from lookaside_server._sources.kube_objects import (
    SERVICE_NAME_LABEL,
    merge_endpoints_objects,
    merge_slices,
    service_port_names,
)

log = logging.getLogger(__name__)

Obj = dict[str, Any]
SOURCE_ENDPOINTSLICES = "endpointslices"
SOURCE_ENDPOINTS = "endpoints"


@dataclass(frozen=True)
class KubeTimings:
    """Timing knobs of the Kubernetes sources (tests shrink them)."""

    #: Full re-list (and republish) of every watched target this often, seconds.
    resync_interval: float = 300.0
    #: ``timeoutSeconds`` of each WATCH request: the stream ends and is resumed this often.
    watch_timeout: float = 240.0
    #: Read timeout of GET/LIST calls (and extra read slack for watches), seconds.
    request_timeout: float = 10.0
    #: TCP connect timeout of every call, seconds.
    connect_timeout: float = 5.0
    #: Reconnect backoff after errors: base * 2^n with jitter, capped.
    backoff_base: float = 1.0
    backoff_cap: float = 30.0


class _Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410 or an ERROR event with code 410): re-list."""


class _Stopped(Exception):
    """The target watch is being stopped."""


def _api_exception() -> type[Exception]:
    from kubernetes.client.exceptions import ApiException

    return ApiException


def _status(e: BaseException) -> int | None:
    status = getattr(e, "status", None)
    return status if isinstance(status, int) else None


def _describe_error(e: BaseException) -> str:
    status = _status(e)
    if status:
        reason = getattr(e, "reason", "") or ""
        body = getattr(e, "body", None)
        message = ""
        if body:
            try:
                message = json.loads(body).get("message", "")
            except (ValueError, AttributeError, TypeError):
                message = ""
        return f"HTTP {status} {reason}{': ' + message if message else ''}".strip()
    text = str(e).strip() or type(e).__name__
    return text if len(text) < 300 else text[:297] + "..."


@dataclass(frozen=True)
class _Kind:
    """What to list and watch for a target, and how to turn the objects into endpoints."""

    name: str
    list_method: Callable[[Any], Callable[..., Any]]  # ApiClient -> bound list function
    selector: Callable[[Target], dict[str, str]]
    merge: Callable[[Mapping[str, Obj], Sequence[str]], Endpoints]


def _slices_list(api: Any) -> Callable[..., Any]:
    from kubernetes import client

    return client.DiscoveryV1Api(api).list_namespaced_endpoint_slice


def _endpoints_list(api: Any) -> Callable[..., Any]:
    from kubernetes import client

    return client.CoreV1Api(api).list_namespaced_endpoints


KINDS: dict[str, _Kind] = {
    SOURCE_ENDPOINTSLICES: _Kind(SOURCE_ENDPOINTSLICES, _slices_list,
                                 lambda t: {"label_selector": f"{SERVICE_NAME_LABEL}={t.service}"},
                                 merge_slices),
    SOURCE_ENDPOINTS: _Kind(SOURCE_ENDPOINTS, _endpoints_list,
                            lambda t: {"field_selector": f"metadata.name={t.service}"},
                            merge_endpoints_objects),
}


class _Backoff:
    def __init__(self, base: float, cap: float) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


class _TargetWatch:
    """One target's objects, resourceVersion and watch thread (all blocking client calls happen here)."""

    def __init__(self, source: KubernetesSource, target: Target) -> None:
        self.source = source
        self.target = target
        self.kind = source.kind_spec
        self._list_fn = self.kind.list_method(source.api_client)
        self.objects: dict[str, Obj] = {}
        self.resource_version = ""
        self.service_exists = True
        self.port_order: list[str] = []
        self.next_resync = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._resp: Any = None
        self.thread: threading.Thread | None = None
        # health, for describe()
        self.last_event = 0.0
        self.restarts = 0
        self.errors = 0
        self.last_error = ""
        self.watching = False

    # -- blocking calls (worker or watch thread) -----------------------------------------------------

    def _timeout(self) -> tuple[float, float]:
        t = self.source.timings
        return (t.connect_timeout, t.request_timeout)

    def read_service(self) -> Obj | None:
        """The Service object, None if it does not exist (404)."""
        from kubernetes import client

        resp: Any
        try:
            resp = client.CoreV1Api(self.source.api_client).read_namespaced_service(
                self.target.service, self.target.namespace, _preload_content=False,
                _request_timeout=self._timeout())
        except _api_exception() as e:
            if _status(e) == 404:
                return None
            raise
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()

    def _refresh_service(self) -> None:
        service = self.read_service()
        self.service_exists = service is not None
        if service is not None:
            self.port_order = service_port_names(service)

    def list_now(self) -> Endpoints | None:
        """Read the Service and LIST its objects; replace the kept state; return the merged endpoints."""
        self._refresh_service()
        resp = self._list_fn(self.target.namespace, _preload_content=False, _request_timeout=self._timeout(),
                             **self.kind.selector(self.target))
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        self.objects = {item["metadata"]["name"]: item for item in body.get("items") or ()}
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        self.next_resync = time.monotonic() + self.source.timings.resync_interval
        return self.current()

    def current(self) -> Endpoints | None:
        if not self.service_exists:
            return None
        return self.kind.merge(self.objects, self.port_order)

    # -- the watch thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"kube-watch {self.target}", daemon=False)
        self.thread.start()

    def request_stop(self) -> None:
        """Ask the thread to end; cut its open watch stream at once (thread-safe, never blocks long)."""
        self._stop.set()
        with self._lock:
            resp = self._resp
        if resp is not None:
            conn = getattr(resp, "connection", None)
            sock = getattr(conn, "sock", None) if conn is not None else None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end, re-cutting its stream while it runs; True if it ended."""
        deadline = time.monotonic() + timeout
        while self.thread is not None and self.thread.is_alive():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.request_stop()
            self.thread.join(min(left, 0.05))
        return True

    def _run(self) -> None:
        timings = self.source.timings
        backoff = _Backoff(timings.backoff_base, timings.backoff_cap)
        need_list = False
        gone_in_a_row = 0
        while not self._stop.is_set():
            try:
                if need_list or time.monotonic() >= self.next_resync:
                    self.source.post(self, self.list_now())
                    need_list = False
                self._watch_once()
                backoff.reset()
                gone_in_a_row = 0
            except _Stopped:
                break
            except _Gone as e:
                if self._stop.is_set():
                    break
                self.restarts += 1
                log.info("watch of %s %s expired (%s): re-listing", self.kind.name, self.target, e)
                need_list = True
                gone_in_a_row += 1
                if gone_in_a_row > 1:  # a 410 right after a fresh list is unusual: do not hammer the API
                    self._stop.wait(backoff.next())
            except BaseException as e:  # noqa: BLE001 - nothing may escape: back off and retry
                if self._stop.is_set():
                    break
                self.errors += 1
                self.last_error = _describe_error(e)
                delay = backoff.next()
                log.warning("kubernetes %s of %s failed (%s); keeping the last known endpoints, "
                            "retrying in %.2f s", self.kind.name, self.target, self.last_error, delay)
                if _status(e) == 410:
                    need_list = True
                self._stop.wait(delay)
        log.debug("watch thread of %s ended", self.target)

    def _watch_once(self) -> None:
        """One WATCH request from the kept resourceVersion until the server ends it or it is stopped."""
        timings = self.source.timings
        left = self.next_resync - time.monotonic()
        timeout = max(1, int(min(timings.watch_timeout, left) + 0.999))
        # The response headers must come within request_timeout (a stop cannot cut a request before them);
        # then the socket gets the stream's own read timeout (the server ends it after ``timeout``).
        kwargs: dict[str, Any] = dict(self.kind.selector(self.target), watch=True, _preload_content=False,
                                      allow_watch_bookmarks=True, timeout_seconds=timeout,
                                      _request_timeout=(timings.connect_timeout, timings.request_timeout))
        if self.resource_version:
            kwargs["resource_version"] = self.resource_version
        try:
            resp = self._list_fn(self.target.namespace, **kwargs)
        except _api_exception() as e:
            if _status(e) == 410:
                raise _Gone(_describe_error(e)) from e
            raise
        with self._lock:
            self._resp = resp
        try:
            if self._stop.is_set():
                raise _Stopped
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            if sock is not None:
                sock.settimeout(timeout + timings.request_timeout)
            self.watching = True
            from kubernetes.watch.watch import iter_resp_lines

            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    raise _Stopped
                if line.strip():
                    self._event(json.loads(line))
        except Exception:
            if self._stop.is_set():
                raise _Stopped from None
            raise
        finally:
            self.watching = False
            with self._lock:
                self._resp = None
            try:
                resp.close()
                resp.release_conn()
            except Exception:  # noqa: BLE001 - the socket may already be shut down
                pass

    def _event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            message = f"{obj.get('reason', '')}: {obj.get('message', '')}"
            if code == 410:
                raise _Gone(message)
            raise RuntimeError(f"watch ERROR event {code} {message}")
        meta = obj.get("metadata") or {}
        if rv := meta.get("resourceVersion"):
            self.resource_version = str(rv)
        self.last_event = time.time()
        if kind == "BOOKMARK":
            return
        name = meta.get("name")
        if not name or kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        was_empty = not self.objects
        if kind == "DELETED":
            self.objects.pop(name, None)
        else:
            self.objects[name] = obj
        # The Service's existence decides between "no endpoints" and NOT_FOUND: check it when the
        # objects all went away (the Service may have been deleted) or came back while it was gone.
        if (not self.objects and not was_empty) or (self.objects and not self.service_exists):
            try:
                self._refresh_service()
            except Exception as e:  # noqa: BLE001 - keep the previous answer; the resync re-checks
                self.errors += 1
                self.last_error = f"reading the Service: {_describe_error(e)}"
        self.source.post(self, self.current())

    def describe(self) -> dict[str, str | int | float]:
        return {
            "source": self.kind.name,
            "resource_version": self.resource_version,
            "last_event": round(self.last_event, 3),
            "restarts": self.restarts,
            "errors": self.errors,
            "last_error": self.last_error,
            "watching": int(self.watching),
            "slices": len(self.objects),
        }


class KubernetesSource(EndpointSource):
    """Endpoints of Kubernetes Services from EndpointSlices (``kind="endpointslices"``, the default) or the
    deprecated core/v1 Endpoints (``kind="endpoints"``, for old clusters), watched lazily per target.

    ``api_client``: a ``kubernetes.client.ApiClient`` (tests point one at a test API server); by default one
    is built from the in-cluster configuration or the kubeconfig (``kubeconfig`` path). Targets unused for
    ``idle_timeout`` seconds are unwatched (None: never); at most ``max_targets`` are watched at once.
    """

    def __init__(self, api_client: Any = None, *, kind: str = SOURCE_ENDPOINTSLICES,
                 kubeconfig: str | None = None, timings: KubeTimings | None = None,
                 idle_timeout: float | None = 600.0, max_targets: int = 1000,
                 join_timeout: float = 15.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown Kubernetes source kind {kind!r} (use {' or '.join(KINDS)})")
        if max_targets < 1:
            raise ValueError("max_targets must be at least 1")
        self.kind_spec = KINDS[kind]
        self.kind = f"kubernetes {kind}"
        self._own_client = api_client is None
        if api_client is None:
            from lookaside_server._sources.kube_config import make_api_client

            api_client = make_api_client(kubeconfig)
        self.api_client = api_client
        self.timings = timings or KubeTimings()
        self.idle_timeout = idle_timeout
        self.max_targets = max_targets
        self.join_timeout = join_timeout
        self._publish: Publish | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: dict[Target, _TargetWatch] = {}
        self._pending: set[Target] = set()
        self._retired: list[_TargetWatch] = []
        self._stopped = False

    # -- EndpointSource ------------------------------------------------------------------------------

    async def start(self, publish: Publish) -> None:
        """Remember the loop and the publish callback; nothing is watched until a target is used."""
        self._publish = publish
        self._loop = asyncio.get_running_loop()
        self._stopped = False

    async def subscribe(self, target: Target) -> None:
        """Read the Service and list its objects (in a worker thread), publish, then start watching."""
        if self._stopped or self._publish is None:
            raise SourceUnavailable("the Kubernetes source is stopped")
        if target in self._watches:
            self._publish(target, self._watches[target].current())
            return
        if len(self._watches) + len(self._pending) >= self.max_targets:
            raise TooManyTargets(target, self.max_targets)
        self._pending.add(target)
        try:
            tw = _TargetWatch(self, target)
            try:
                endpoints = await asyncio.to_thread(tw.list_now)
            except Exception as e:  # noqa: BLE001 - any client failure: the API cannot answer now
                log.warning("cannot read %s %s from the Kubernetes API: %s", self.kind_spec.name, target,
                            _describe_error(e))
                raise SourceUnavailable(f"Kubernetes API: {_describe_error(e)}") from e
            if endpoints is None:
                raise TargetNotFound(target)
            if self._stopped:
                raise SourceUnavailable("the Kubernetes source is stopped")
            self._watches[target] = tw
            self._publish(target, endpoints)
            tw.start()
            log.info("watching %s of %s from resourceVersion %s (%d object(s))", self.kind_spec.name, target,
                     tw.resource_version, len(tw.objects))
        finally:
            self._pending.discard(target)

    async def unsubscribe(self, target: Target) -> None:
        """Stop watching ``target`` (its thread is cut now and joined at :meth:`stop` at the latest)."""
        tw = self._watches.pop(target, None)
        if tw is None:
            return
        tw.request_stop()
        self._retired = [t for t in self._retired if t.thread is not None and t.thread.is_alive()]
        self._retired.append(tw)
        log.info("stopped watching %s", target)

    async def stop(self) -> None:
        """Stop every watch and join every thread (never leaves a thread inside a request)."""
        self._stopped = True
        watches = list(self._watches.values()) + self._retired
        self._watches.clear()
        self._retired = []
        for tw in watches:
            tw.request_stop()
        if watches:
            await asyncio.to_thread(self._join_all, watches)
        self._publish = None
        if self._own_client:
            try:
                self.api_client.close()
            except Exception:  # noqa: BLE001
                pass

    def _join_all(self, watches: list[_TargetWatch]) -> None:
        deadline = time.monotonic() + self.join_timeout
        for tw in watches:
            if not tw.join(max(0.0, deadline - time.monotonic())):
                log.error("watch thread of %s did not stop within %.0f s", tw.target, self.join_timeout)

    def describe(self, target: Target) -> dict[str, str | int | float]:
        """Watch health of ``target``: resource_version, last_event, restarts, errors, last_error,
        watching (0/1) and slices (objects kept)."""
        tw = self._watches.get(target)
        return tw.describe() if tw is not None else {}

    # -- from the watch threads ----------------------------------------------------------------------

    def post(self, tw: _TargetWatch, endpoints: Endpoints | None) -> None:
        """Hand a target's new state to the loop (any thread)."""
        loop = self._loop
        if loop is None or self._stopped:
            return
        try:
            loop.call_soon_threadsafe(self._deliver, tw, endpoints)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    def _deliver(self, tw: _TargetWatch, endpoints: Endpoints | None) -> None:
        # on the loop: only the current watch of a subscribed target may publish
        if self._publish is not None and self._watches.get(tw.target) is tw:
            self._publish(tw.target, endpoints)

    @property
    def watched(self) -> list[Target]:
        """The targets being watched now."""
        return sorted(self._watches, key=str)

    def threads(self) -> list[threading.Thread]:
        """Live watch threads (for tests and diagnostics)."""
        return [tw.thread for tw in list(self._watches.values()) + self._retired
                if tw.thread is not None and tw.thread.is_alive()]
