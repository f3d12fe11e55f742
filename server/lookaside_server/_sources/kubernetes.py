"""Kubernetes endpoint sources: EndpointSlices (discovery.k8s.io/v1) and the core/v1 Endpoints fallback.

One LIST+WATCH per namespace, shared by every Service in it (or one for the whole cluster with
``cluster_wide=True``, when the server answers for every namespace):

1. the first Resolve/Watch of a Service in a namespace starts that namespace's *scope*: it LISTs the
   namespace's Services and its EndpointSlices (or Endpoints objects) in a worker thread, then two threads
   WATCH them (Services, and the endpoint objects) from the lists' resourceVersions;
2. every object is converted at once to a compact form (:mod:`kube_objects`: a Service's ports; a slice's
   owning Service and endpoints, each with the Service port number its port name maps to, kept current
   when the Service's ports change) and the raw JSON is dropped; each change recomputes only the Services
   it touches, and a subscribed Service whose merged state changed is published through
   ``loop.call_soon_threadsafe``;
3. a Service that does not exist (not in the namespace's Service list) is NOT_FOUND, answered from the
   cache; a Service with no ready endpoint is an existing, empty target (UNAVAILABLE for Resolve);
4. the scope is stopped once no target of it has been subscribed for ``idle_timeout`` seconds (60 s when
   targets never expire): targets expire one by one (the registry's idle sweep), namespaces after them.

Robustness, per WATCH stream: the resourceVersion is tracked from every event and BOOKMARK; a 410 Gone (HTTP
status or ERROR event) re-lists; any other failure (API down, 5xx, cut stream) backs off exponentially with
jitter and resumes the watch from the last resourceVersion, while the last known endpoints keep being
served; every ``resync_interval`` a full re-list republishes what changed. Nothing raised by the client
leaves a watch thread.

The watch uses the official client's API functions exactly as ``kubernetes.watch.Watch.stream`` does
(``watch=True``, ``_preload_content=False``, one JSON event per line) but keeps the HTTP response in hand,
so that stopping a scope shuts its sockets down at once: threads are non-daemon and always joined on
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lookaside_server._core.model import BackendEndpoint, Endpoints, Target
from lookaside_server._sources.base import (
    EndpointSource,
    Publish,
    SourceUnavailable,
    TargetNotFound,
    TooManyTargets,
)
from lookaside_server._sources.kube_objects import (
    NumbersOf,
    ServiceInfo,
    endpoints_member,
    merge_members,
    object_key,
    service_info,
    slice_member,
    with_service_ports,
)

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, service)
Member = tuple[str, tuple[BackendEndpoint, ...]]
SOURCE_ENDPOINTSLICES = "endpointslices"
SOURCE_ENDPOINTS = "endpoints"
#: Items per LIST page (``limit``/``continue``): large namespaces are read in pages, as informers do.
LIST_PAGE = 500


@dataclass(frozen=True)
class KubeTimings:
    """Timing knobs of the Kubernetes sources (tests shrink them)."""

    #: Full re-list (and republish of what changed) of every watched namespace this often, seconds.
    resync_interval: float = 300.0
    #: ``timeoutSeconds`` of each WATCH request: the stream ends and is resumed this often.
    watch_timeout: float = 240.0
    #: Read timeout of LIST calls (and extra read slack for watches), seconds.
    request_timeout: float = 10.0
    #: TCP connect timeout of every call, seconds.
    connect_timeout: float = 5.0
    #: Reconnect backoff after errors: base * 2^n with jitter, capped.
    backoff_base: float = 1.0
    backoff_cap: float = 30.0


class _Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410 or an ERROR event with code 410): re-list."""


class _Stopped(Exception):
    """The watch is being stopped."""


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


# -- what is listed and watched ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Resource:
    """A resource the source lists and watches, per namespace or cluster-wide."""

    name: str
    #: ApiClient -> (namespace or None for every namespace) -> the list function (LIST, or WATCH with
    #: ``watch=True``) taking keyword arguments only.
    lister: Callable[[Any, str | None], Callable[..., Any]]
    #: For endpoint objects: the owning Service and converted endpoints of an object (None: not a member).
    #: Takes the object and the Service port numbers by Service name (``kube_objects.NumbersOf``).
    member: Callable[[Obj, NumbersOf], Member | None] | None = None


def _lister(
    api_class: str, namespaced: str, everywhere: str
) -> Callable[[Any, str | None], Callable[..., Any]]:
    def make(api: Any, namespace: str | None) -> Callable[..., Any]:
        from kubernetes import client

        apis = getattr(client, api_class)(api)
        if namespace is None:
            return getattr(apis, everywhere)
        fn = getattr(apis, namespaced)
        return lambda **kw: fn(namespace, **kw)

    return make


SERVICES = _Resource(
    "services", _lister("CoreV1Api", "list_namespaced_service", "list_service_for_all_namespaces")
)
KINDS: dict[str, _Resource] = {
    SOURCE_ENDPOINTSLICES: _Resource(
        SOURCE_ENDPOINTSLICES,
        _lister("DiscoveryV1Api", "list_namespaced_endpoint_slice", "list_endpoint_slice_for_all_namespaces"),
        slice_member,
    ),
    SOURCE_ENDPOINTS: _Resource(
        SOURCE_ENDPOINTS,
        _lister("CoreV1Api", "list_namespaced_endpoints", "list_endpoints_for_all_namespaces"),
        endpoints_member,
    ),
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


# -- one LIST+WATCH stream (a thread) ------------------------------------------------------------------------


class _Stream:
    """One resource of one scope: its resourceVersion and watch thread (every blocking client call is here).
    Objects go to the scope (:meth:`_Scope.replace` after a LIST, :meth:`_Scope.apply` per event)."""

    def __init__(self, scope: _Scope, resource: _Resource) -> None:
        self.scope = scope
        self.resource = resource
        self.timings = scope.source.timings
        self._list_fn = resource.lister(scope.source.api_client, scope.namespace)
        self.resource_version = ""
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

    def _timeout(self) -> tuple[float, float]:
        return (self.timings.connect_timeout, self.timings.request_timeout)

    def list_now(self) -> None:
        """LIST every object (in pages), hand them to the scope, keep the list's resourceVersion."""
        items: list[Obj] = []
        token = ""
        while True:
            kwargs: dict[str, Any] = {
                "_preload_content": False,
                "_request_timeout": self._timeout(),
                "limit": LIST_PAGE,
            }
            if token:
                kwargs["_continue"] = token
            resp = self._list_fn(**kwargs)
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            items.extend(body.get("items") or ())
            meta = body.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                break
        self.scope.replace(self.resource, items)
        self.resource_version = str(meta.get("resourceVersion") or "")
        self.next_resync = time.monotonic() + self.timings.resync_interval

    # -- the watch thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        where = self.scope.namespace or "*"
        self.thread = threading.Thread(
            target=self._run, name=f"kube-watch {self.resource.name} {where}", daemon=False
        )
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

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _run(self) -> None:
        backoff = _Backoff(self.timings.backoff_base, self.timings.backoff_cap)
        need_list = False
        gone_in_a_row = 0
        what = f"{self.resource.name} of {self.scope.label}"
        while not self._stop.is_set():
            try:
                if need_list or time.monotonic() >= self.next_resync:
                    self.list_now()
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
                log.info("watch of %s expired (%s): re-listing", what, e)
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
                log.warning(
                    "kubernetes %s failed (%s); keeping the last known endpoints, retrying in %.2f s",
                    what,
                    self.last_error,
                    delay,
                )
                if _status(e) == 410:
                    need_list = True
                self._stop.wait(delay)
        log.debug("watch thread of %s ended", what)

    def _watch_once(self) -> None:
        """One WATCH request from the kept resourceVersion until the server ends it or it is stopped."""
        timings = self.timings
        left = self.next_resync - time.monotonic()
        timeout = max(1, int(min(timings.watch_timeout, left) + 0.999))
        # The response headers must come within request_timeout (a stop cannot cut a request before them);
        # then the socket gets the stream's own read timeout (the server ends it after ``timeout``).
        kwargs: dict[str, Any] = dict(
            watch=True,
            _preload_content=False,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(timings.connect_timeout, timings.request_timeout),
        )
        if self.resource_version:
            kwargs["resource_version"] = self.resource_version
        try:
            resp = self._list_fn(**kwargs)
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
        if kind in ("ADDED", "MODIFIED", "DELETED"):  # BOOKMARK: only the resourceVersion
            self.scope.apply(self.resource, kind, obj)


# -- one namespace (or the whole cluster): its objects, compact, and the targets subscribed in it ------------


class _Scope:
    """The Services and endpoint objects of one namespace (``namespace=None``: every namespace), kept in
    compact form, and the subscribed targets whose state they decide. Thread-safe: the two watch threads
    write, the loop reads; every publish is handed to the loop while the lock is held, so the loop sees
    each target's states in the order they were computed."""

    def __init__(self, source: KubernetesSource, namespace: str | None) -> None:
        self.source = source
        self.namespace = namespace
        self.label = f"namespace {namespace}" if namespace is not None else "every namespace"
        self.kind = source.kind_spec
        self.lock = threading.Lock()
        self.services: dict[Key, ServiceInfo] = {}
        #: (namespace, object name) -> the Service it belongs to and its endpoints
        self.members: dict[Key, Member] = {}
        #: (namespace, service) -> object name -> endpoints
        self.by_service: dict[Key, dict[str, tuple[BackendEndpoint, ...]]] = {}
        self.targets: dict[Key, set[Target]] = {}
        self.published: dict[Key, Endpoints | None] = {}
        self.seq = 0
        self.streams = (_Stream(self, SERVICES), _Stream(self, self.kind))
        self.started: asyncio.Task[None] | None = None
        self.idle_since: float | None = None

    # -- the state of a Service (lock held) ------------------------------------------------------------------

    def state(self, key: Key) -> Endpoints | None:
        info = self.services.get(key)
        if info is None:
            return None
        return merge_members(self.by_service.get(key) or {}, info.port_names)

    def _post_changed(self, keys: Iterable[Key]) -> None:
        for key in keys:
            targets = self.targets.get(key)
            if not targets:
                continue
            state = self.state(key)
            if key in self.published and self.published[key] == state:
                continue
            self.published[key] = state
            self.seq += 1
            for target in targets:
                self.source.post(self, target, state, self.seq)

    # -- from the watch threads ------------------------------------------------------------------------------

    def _add_member(self, key: Key, member: Member | None) -> Key | None:
        if member is None:
            return None
        skey = (key[0], member[0])
        self.members[key] = member
        self.by_service.setdefault(skey, {})[key[1]] = member[1]
        return skey

    def _member(self, resource: _Resource, key: Key, obj: Obj) -> Member | None:
        """The object converted, its endpoints numbered with its Service's ports as known now."""
        assert resource.member is not None
        return resource.member(obj, lambda service: self._numbers((key[0], service)))

    def _numbers(self, skey: Key) -> dict[str, int]:
        info = self.services.get(skey)
        return info.port_numbers if info is not None else {}

    def _renumber(self, skey: Key) -> None:
        """The Service's ports changed: set its endpoints' Service port numbers again."""
        objs = self.by_service.get(skey)
        if objs:
            numbers = self._numbers(skey)
            for name, eps in objs.items():
                objs[name] = with_service_ports(eps, numbers)

    def _remove_member(self, key: Key) -> Key | None:
        old = self.members.pop(key, None)
        if old is None:
            return None
        skey = (key[0], old[0])
        objs = self.by_service.get(skey)
        if objs is not None:
            objs.pop(key[1], None)
            if not objs:
                del self.by_service[skey]
        return skey

    def replace(self, resource: _Resource, items: list[Obj]) -> None:
        """A fresh LIST of ``resource``: replace what is kept of it; publish the targets that changed."""
        with self.lock:
            if resource.member is None:
                old = self.services
                self.services = {k: service_info(o) for o in items if (k := object_key(o)) is not None}
                for skey, info in self.services.items():
                    if (was := old.get(skey)) is None or was.port_numbers != info.port_numbers:
                        self._renumber(skey)
            else:
                self.members, self.by_service = {}, {}
                for obj in items:
                    if (key := object_key(obj)) is not None:
                        self._add_member(key, self._member(resource, key, obj))
            self._post_changed(list(self.targets))

    def apply(self, resource: _Resource, kind: str, obj: Obj) -> None:
        """One ADDED/MODIFIED/DELETED event: update the compact state; publish the targets it changed."""
        key = object_key(obj)
        if key is None:
            return
        with self.lock:
            if resource.member is None:
                if kind == "DELETED":
                    self.services.pop(key, None)
                else:
                    info, was = service_info(obj), self.services.get(key)
                    self.services[key] = info
                    if was is None or was.port_numbers != info.port_numbers:
                        self._renumber(key)
                touched: list[Key | None] = [key]
            else:
                # a slice can move to another Service (its label changed): both are touched
                touched = [self._remove_member(key)]
                if kind != "DELETED":
                    touched.append(self._add_member(key, self._member(resource, key, obj)))
            self._post_changed({k for k in touched if k is not None})

    # -- lifecycle (blocking parts run in threads) -----------------------------------------------------------

    def initial_list(self) -> None:
        for stream in self.streams:
            stream.list_now()

    def start_watching(self) -> None:
        for stream in self.streams:
            stream.start()

    def request_stop(self) -> None:
        for stream in self.streams:
            stream.request_stop()

    def describe(self, key: Key) -> dict[str, str | int | float]:
        services, endpoints = self.streams
        with self.lock:
            objects = len(self.by_service.get(key) or ())
        return {
            "source": self.kind.name,
            "scope": self.namespace if self.namespace is not None else "*",
            "resource_version": endpoints.resource_version,
            "services_resource_version": services.resource_version,
            "last_event": round(max(endpoints.last_event, services.last_event), 3),
            "restarts": endpoints.restarts + services.restarts,
            "errors": endpoints.errors + services.errors,
            "last_error": endpoints.last_error or services.last_error,
            "watching": int(endpoints.watching and services.watching),
            "slices": objects,
        }


class KubernetesSource(EndpointSource):
    """Endpoints of Kubernetes Services from EndpointSlices (``kind="endpointslices"``, the default) or the
    deprecated core/v1 Endpoints (``kind="endpoints"``, for old clusters).

    One LIST+WATCH of Services and one of the endpoint objects per namespace in use, shared by all its
    Services, started by the first Resolve/Watch there (``cluster_wide=True``: one pair for every
    namespace, which needs cluster-wide list/watch RBAC). ``api_client``: a ``kubernetes.client.ApiClient``
    (tests point one at a test API server); by default one is built from the in-cluster configuration or
    the kubeconfig (``kubeconfig`` path). Targets unused for ``idle_timeout`` seconds are unwatched (None:
    never) and a namespace without targets for as long (60 s if None) stops its watches; at most
    ``max_targets`` targets are tracked at once.
    """

    def __init__(
        self,
        api_client: Any = None,
        *,
        kind: str = SOURCE_ENDPOINTSLICES,
        kubeconfig: str | None = None,
        timings: KubeTimings | None = None,
        idle_timeout: float | None = 600.0,
        max_targets: int = 1000,
        join_timeout: float = 15.0,
        cluster_wide: bool = False,
    ) -> None:
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
        self.scope_linger = idle_timeout if idle_timeout is not None else 60.0
        self.max_targets = max_targets
        self.join_timeout = join_timeout
        self.cluster_wide = cluster_wide
        self._publish: Publish | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scopes: dict[str | None, _Scope] = {}
        self._targets: dict[Target, _Scope] = {}
        self._delivered: dict[Target, int] = {}
        self._pending: set[Target] = set()
        self._retired: list[_Scope] = []
        self._stopped = False

    # -- EndpointSource --------------------------------------------------------------------------------------

    async def start(self, publish: Publish) -> None:
        """Remember the loop and the publish callback; nothing is watched until a target is used."""
        self._publish = publish
        self._loop = asyncio.get_running_loop()
        self._stopped = False

    async def subscribe(self, target: Target) -> None:
        """Start the target's namespace watches if needed (LIST in a worker thread), publish its state."""
        if self._stopped or self._publish is None:
            raise SourceUnavailable("the Kubernetes source is stopped")
        key = (target.namespace, target.service)
        scope = self._targets.get(target)
        if scope is not None:
            with scope.lock:
                state = scope.state(key)
                scope.seq += 1
                self._delivered[target] = scope.seq
            self._publish(target, state)
            return
        if len(self._targets) + len(self._pending) >= self.max_targets:
            raise TooManyTargets(target, self.max_targets)
        self._pending.add(target)
        try:
            scope = await self._scope_for(target.namespace)
            with scope.lock:
                state = scope.state(key)
                if state is not None:
                    scope.targets.setdefault(key, set()).add(target)
                    scope.published.setdefault(key, state)
                    scope.seq += 1
                    self._delivered[target] = scope.seq
                    self._targets[target] = scope
                    scope.idle_since = None
            if state is None:
                self._check_idle(scope)
                raise TargetNotFound(target)
            self._publish(target, state)
        finally:
            self._pending.discard(target)

    async def unsubscribe(self, target: Target) -> None:
        """Stop tracking ``target``; its namespace's watches stop once no target used them for a while."""
        scope = self._targets.pop(target, None)
        self._delivered.pop(target, None)
        if scope is None:
            return
        key = (target.namespace, target.service)
        with scope.lock:
            targets = scope.targets.get(key)
            if targets is not None:
                targets.discard(target)
                if not targets:
                    del scope.targets[key]
                    scope.published.pop(key, None)
        self._check_idle(scope)
        log.info("stopped watching %s", target)

    async def stop(self) -> None:
        """Stop every watch and join every thread (never leaves a thread inside a request)."""
        self._stopped = True
        scopes = list(self._scopes.values()) + self._retired
        self._scopes.clear()
        self._targets.clear()
        self._retired = []
        for scope in scopes:
            scope.request_stop()
        streams = [s for scope in scopes for s in scope.streams]
        if streams:
            await asyncio.to_thread(self._join_all, streams)
        self._publish = None
        if self._own_client:
            try:
                self.api_client.close()
            except Exception:  # noqa: BLE001
                pass

    def _join_all(self, streams: list[_Stream]) -> None:
        deadline = time.monotonic() + self.join_timeout
        for stream in streams:
            if not stream.join(max(0.0, deadline - time.monotonic())):
                log.error(
                    "watch thread of %s of %s did not stop within %.0f s",
                    stream.resource.name,
                    stream.scope.label,
                    self.join_timeout,
                )

    def describe(self, target: Target) -> dict[str, str | int | float]:
        """Watch health of ``target``'s namespace: resource_version (endpoint objects),
        services_resource_version, last_event, restarts, errors, last_error, watching (0/1), scope (the
        namespace watched, ``*`` for all) and slices (the target's objects kept)."""
        scope = self._targets.get(target)
        return scope.describe((target.namespace, target.service)) if scope is not None else {}

    # -- scopes (on the loop) --------------------------------------------------------------------------------

    async def _scope_for(self, namespace: str) -> _Scope:
        """The started scope holding ``namespace``, starting it (LIST, then the watch threads) if needed."""
        name = None if self.cluster_wide else namespace
        scope = self._scopes.get(name)
        if scope is None:
            scope = _Scope(self, name)
            self._scopes[name] = scope
            scope.started = asyncio.get_running_loop().create_task(self._start_scope(scope))
            # its waiters may all be cancelled (their RPCs ended): the failure is logged, never "unretrieved"
            scope.started.add_done_callback(lambda t: t.cancelled() or t.exception())
        assert scope.started is not None
        await asyncio.shield(scope.started)
        return scope

    async def _start_scope(self, scope: _Scope) -> None:
        try:
            await asyncio.to_thread(scope.initial_list)
        except Exception as e:  # noqa: BLE001 - any client failure: the API cannot answer now
            if self._scopes.get(scope.namespace) is scope:
                del self._scopes[scope.namespace]
            log.warning(
                "cannot list %s of %s from the Kubernetes API: %s",
                self.kind_spec.name,
                scope.label,
                _describe_error(e),
            )
            raise SourceUnavailable(f"Kubernetes API: {_describe_error(e)}") from e
        if self._stopped or self._scopes.get(scope.namespace) is not scope:
            raise SourceUnavailable("the Kubernetes source is stopped")
        scope.start_watching()
        services, endpoints = scope.streams
        log.info(
            "watching Services and %s of %s from resourceVersions %s/%s (%d Service(s), %d object(s))",
            self.kind_spec.name,
            scope.label,
            services.resource_version,
            endpoints.resource_version,
            len(scope.services),
            len(scope.members),
        )
        # no target yet: if every subscriber gave up meanwhile (cancelled RPCs), the scope still ends
        self._check_idle(scope)

    def _check_idle(self, scope: _Scope) -> None:
        """Schedule the end of a scope that has no target left (it ends if none comes back in time)."""
        if scope.targets or self._loop is None or self._stopped:
            return
        if scope.idle_since is None:
            scope.idle_since = self._loop.time()
            self._loop.call_later(self.scope_linger, self._retire_if_idle, scope)

    def _retire_if_idle(self, scope: _Scope) -> None:
        if self._stopped or scope.targets or scope.idle_since is None:
            return
        if (
            self._scopes.get(scope.namespace) is not scope
            or scope.started is None
            or not scope.started.done()
        ):
            return
        assert self._loop is not None
        if self._loop.time() - scope.idle_since < self.scope_linger * 0.999:
            return  # used and left again since: a later call decides
        del self._scopes[scope.namespace]
        scope.request_stop()
        self._retired = [s for s in self._retired if any(st.alive() for st in s.streams)]
        self._retired.append(scope)
        log.info("stopped watching %s (no target used it for %.0f s)", scope.label, self.scope_linger)

    # -- from the watch threads ------------------------------------------------------------------------------

    def post(self, scope: _Scope, target: Target, endpoints: Endpoints | None, seq: int) -> None:
        """Hand a target's new state to the loop (any thread; called with the scope's lock held)."""
        loop = self._loop
        if loop is None or self._stopped:
            return
        try:
            loop.call_soon_threadsafe(self._deliver, scope, target, endpoints, seq)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    def _deliver(self, scope: _Scope, target: Target, endpoints: Endpoints | None, seq: int) -> None:
        # on the loop: only the current scope of a subscribed target may publish, and never an older state
        if self._publish is None or self._targets.get(target) is not scope:
            return
        if seq <= self._delivered.get(target, 0):
            return
        self._delivered[target] = seq
        self._publish(target, endpoints)

    @property
    def watched(self) -> list[Target]:
        """The targets being watched now."""
        return sorted(self._targets, key=str)

    @property
    def watched_namespaces(self) -> list[str]:
        """The namespaces watched now (``*`` for the cluster-wide watch)."""
        return sorted(n if n is not None else "*" for n in self._scopes)

    def threads(self) -> list[threading.Thread]:
        """Live watch threads (for tests and diagnostics)."""
        return [
            s.thread
            for scope in list(self._scopes.values()) + self._retired
            for s in scope.streams
            if s.thread is not None and s.thread.is_alive()
        ]
