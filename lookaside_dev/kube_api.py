"""A small but real Kubernetes API server for tests, spoken to over TCP by the official ``kubernetes`` client.

It serves, over plain HTTP/1.1 on 127.0.0.1 and without authentication::

    /apis/discovery.k8s.io/v1[/namespaces/{ns}]/endpointslices[/{name}]
    /api/v1[/namespaces/{ns}]/endpoints[/{name}]
    /api/v1[/namespaces/{ns}]/services[/{name}]

with LIST, GET and WATCH (``?watch=true``) semantics close to kube-apiserver's:

* one global, monotonically increasing resourceVersion; every write bumps it, every object carries it;
* ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``) and
  ``fieldSelector`` (``metadata.name``, ``metadata.namespace`` with ``=``, ``==``, ``!=``);
* WATCH from ``resourceVersion=N`` replays the events after N then streams live ones; an unset, empty or
  ``"0"`` resourceVersion starts with synthetic ADDED events for the current objects (as the real server
  does); N older than the compaction point answers 410 Expired (an HTTP 410 Status by default, or an
  in-stream ERROR event with ``expired_watch="event"``, which is what a real watch cache does);
* a watch filtered by a selector sees an object that stops matching as DELETED and one that starts
  matching as ADDED, like the real server;
* ``timeoutSeconds``; ``allowWatchBookmarks`` (periodic and on-demand BOOKMARK events);
  ``sendInitialEvents`` (synthetic ADDED, then a bookmark annotated ``k8s.io/initial-events-end``);
* watch responses use chunked transfer encoding with one JSON event per line, flushed per event.

Tests mutate the state through Python (:meth:`KubeAPIServer.apply`, :meth:`KubeAPIServer.delete`), inject
faults (:meth:`fail_next`, :meth:`set_delay`, :meth:`inject_watch_error`, :meth:`stop` / :meth:`start` on the
same port) and observe the traffic (:meth:`request_count`, :meth:`open_watch_count`,
:meth:`wait_for_open_watches`).

Deviations from a real API server (on purpose or for brevity): no auth, no discovery documents, no writes
over HTTP (405), ``limit``/``continue`` ignored (allowed by the API), LIST ignores ``resourceVersion``
(always answers the current state), no admission or validation beyond ``addressType`` on EndpointSlices,
loopback addresses are accepted in Endpoints and EndpointSlices (real servers reject them), no protobuf,
JSON only.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import datetime
import http.server
import json
import re
import select
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "KubeAPIServer",
    "RequestRecord",
    "endpoint",
    "endpoint_slice",
    "endpoints",
    "service",
]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
INITIAL_EVENTS_END = "k8s.io/initial-events-end"


@dataclasses.dataclass(frozen=True)
class _Resource:
    plural: str
    kind: str
    api_version: str
    prefix: str  # URL prefix of the group/version


_RESOURCES: dict[str, _Resource] = {
    "endpointslices": _Resource(
        "endpointslices", "EndpointSlice", "discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1"
    ),
    "endpoints": _Resource("endpoints", "Endpoints", "v1", "/api/v1"),
    "services": _Resource("services", "Service", "v1", "/api/v1"),
}

_KIND_ALIASES: dict[str, str] = {
    "endpointslice": "endpointslices",
    "endpointslices": "endpointslices",
    "endpoints": "endpoints",
    "endpoint": "endpoints",
    "ep": "endpoints",
    "service": "services",
    "services": "services",
    "svc": "services",
}

# Paths the server answers: optional namespace, resource plural, optional object name.
_ROUTE = re.compile(
    r"^(?P<prefix>/apis/discovery\.k8s\.io/v1|/api/v1)"
    r"(?:/namespaces/(?P<ns>[^/]+))?"
    r"/(?P<plural>endpointslices|endpoints|services)"
    r"(?:/(?P<name>[^/]+))?/?$"
)

_REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

_SERVER_FIELDS = ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields", "selfLink")

_POLL = 0.05  # seconds between checks for a closed client or a stopped server while a watch is idle


def _resource(kind: str) -> _Resource:
    plural = _KIND_ALIASES.get(kind.lower())
    if plural is None:
        raise ValueError(f"unsupported kind {kind!r}; use EndpointSlice, Endpoints or Service")
    return _RESOURCES[plural]


def status_object(code: int, message: str, reason: str | None = None, details: dict | None = None) -> dict:
    """A ``v1.Status`` failure object, as the API server returns with error responses and ERROR events."""
    obj: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details:
        obj["details"] = details
    return obj


# ---------------------------------------------------------------------------------------------------------
# Selectors


class SelectorError(ValueError):
    pass


def _split_top_level(expr: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in expr:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


_SET_REQ = re.compile(r"^(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)$")
_EQ_REQ = re.compile(r"^(?P<key>[^\s!=()]+)\s*(?P<op>==|!=|=)\s*(?P<value>[^\s!=(),]*)$")
_EXISTS_REQ = re.compile(r"^(?P<neg>!?)\s*(?P<key>[^\s!=(),]+)$")


def parse_label_selector(expr: str | None) -> Callable[[Mapping[str, str]], bool]:
    """Compile a label selector string into a predicate over a labels mapping (raises SelectorError)."""
    if not expr:
        return lambda labels: True
    reqs: list[Callable[[Mapping[str, str]], bool]] = []
    for part in _split_top_level(expr):
        if m := _SET_REQ.match(part):
            key, values = m["key"], {v.strip() for v in m["values"].split(",") if v.strip()}
            if m["op"] == "in":
                reqs.append(lambda lb, k=key, vs=values: k in lb and lb[k] in vs)
            else:
                reqs.append(lambda lb, k=key, vs=values: k not in lb or lb[k] not in vs)
        elif m := _EQ_REQ.match(part):
            key, value = m["key"], m["value"]
            if m["op"] == "!=":
                reqs.append(lambda lb, k=key, v=value: lb.get(k) != v)
            else:
                reqs.append(lambda lb, k=key, v=value: k in lb and lb[k] == v)
        elif m := _EXISTS_REQ.match(part):
            key = m["key"]
            if m["neg"]:
                reqs.append(lambda lb, k=key: k not in lb)
            else:
                reqs.append(lambda lb, k=key: k in lb)
        else:
            raise SelectorError(f"unable to parse requirement: {part!r}")
    return lambda labels: all(r(labels) for r in reqs)


def parse_field_selector(expr: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """Compile a field selector (``metadata.name`` and ``metadata.namespace`` only) into a predicate."""
    if not expr:
        return lambda obj: True
    reqs: list[Callable[[Mapping[str, Any]], bool]] = []
    for part in _split_top_level(expr):
        m = re.match(r"^(?P<field>[^!=\s]+)\s*(?P<op>==|!=|=)\s*(?P<value>.*)$", part)
        if not m:
            raise SelectorError(f"invalid field selector: {part!r}")
        field, op, value = m["field"], m["op"], m["value"].strip()
        if field not in ("metadata.name", "metadata.namespace"):
            raise SelectorError(f"field label not supported: {field}")
        attr = field.split(".", 1)[1]
        if op == "!=":
            reqs.append(lambda o, a=attr, v=value: o.get("metadata", {}).get(a) != v)
        else:
            reqs.append(lambda o, a=attr, v=value: o.get("metadata", {}).get(a) == v)
    return lambda obj: all(r(obj) for r in reqs)


# ---------------------------------------------------------------------------------------------------------
# Builders


def _port(p: int | tuple | Mapping[str, Any], *, service: bool = False) -> dict[str, Any]:
    if isinstance(p, Mapping):
        d = dict(p)
    elif isinstance(p, tuple):
        d = {"name": p[0], "port": int(p[1])}
    else:
        d = {"name": "", "port": int(p)}
    d.setdefault("protocol", "TCP")
    if service:
        d.setdefault("targetPort", d["port"])
        if not d.get("name"):
            d.pop("name", None)
    return d


def endpoint(
    address: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = False,
    zone: str | None = None,
    node_name: str | None = None,
    hostname: str | None = None,
    pod: str | None = None,
    namespace: str = "default",
    for_zones: Sequence[str] | None = None,
    addresses: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One ``endpoints[]`` entry of an EndpointSlice.

    ``serving`` defaults to ``ready``; a condition given as ``None`` is left out (unset)."""
    conditions: dict[str, bool] = {}
    if serving is None:
        serving = ready
    for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if value is not None:
            conditions[key] = bool(value)
    ep: dict[str, Any] = {"addresses": list(addresses) if addresses else [address], "conditions": conditions}
    if zone is not None:
        ep["zone"] = zone
    if node_name is not None:
        ep["nodeName"] = node_name
    if hostname is not None:
        ep["hostname"] = hostname
    if pod is not None:
        ep["targetRef"] = {"kind": "Pod", "name": pod, "namespace": namespace}
    if for_zones is not None:
        ep["hints"] = {"forZones": [{"name": z} for z in for_zones]}
    return ep


def endpoint_slice(
    name: str,
    service: str,
    namespace: str = "default",
    endpoints: Iterable[str | Mapping[str, Any]] = (),
    ports: Iterable[int | tuple | Mapping[str, Any]] = (("grpc", 50051),),
    address_type: str = "IPv4",
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice of ``service``.

    ``endpoints`` items are addresses (ready, serving, not terminating) or full endpoint dicts (see
    :func:`endpoint`); ``ports`` items are port numbers (unnamed), ``(name, port)`` or port dicts.
    """
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                SERVICE_NAME_LABEL: service,
                MANAGED_BY_LABEL: "endpointslice-controller.k8s.io",
                **(labels or {}),
            },
        },
        "addressType": address_type,
        "endpoints": [endpoint(e) if isinstance(e, str) else dict(e) for e in endpoints],
        "ports": [_port(p) for p in ports],
    }


def service(
    name: str,
    namespace: str = "default",
    ports: Iterable[int | tuple | Mapping[str, Any]] = (("grpc", 50051),),
    selector: Mapping[str, str] | None = None,
    cluster_ip: str | None = None,
    headless: bool = False,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A core/v1 Service (ClusterIP, or headless with ``headless=True``)."""
    if cluster_ip is None:
        cluster_ip = "None" if headless else f"10.96.{(hash(name) >> 8) & 0xFF}.{(hash(name) & 0xFE) + 1}"
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "selector": dict(selector if selector is not None else {"app": name}),
            "ports": [_port(p, service=True) for p in ports],
        },
    }


def endpoints(
    name: str,
    namespace: str = "default",
    subsets: Iterable[Mapping[str, Any]] | None = None,
    *,
    addresses: Iterable[str | Mapping[str, Any]] = (),
    not_ready: Iterable[str | Mapping[str, Any]] = (),
    ports: Iterable[int | tuple | Mapping[str, Any]] = (("grpc", 50051),),
) -> dict[str, Any]:
    """A core/v1 Endpoints object: explicit ``subsets``, or one subset built from addresses and ports."""
    if subsets is None:
        addrs = [{"ip": a} if isinstance(a, str) else dict(a) for a in addresses]
        nready = [{"ip": a} if isinstance(a, str) else dict(a) for a in not_ready]
        subset: dict[str, Any] = {"ports": [_port(p) for p in ports]}
        if addrs:
            subset["addresses"] = addrs
        if nready:
            subset["notReadyAddresses"] = nready
        subsets = [subset] if (addrs or nready) else []
    return {
        "kind": "Endpoints",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace},
        "subsets": [dict(s) for s in subsets],
    }


# ---------------------------------------------------------------------------------------------------------
# Server


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, str]
    verb: str  # "list", "watch", "get", or "other"
    resource: str | None  # plural, e.g. "endpointslices"
    namespace: str | None
    name: str | None
    time: float


@dataclasses.dataclass
class _Event:
    rv: int
    type: str
    obj: dict[str, Any]
    prev: dict[str, Any] | None  # the object before a MODIFIED


class _Watcher:
    def __init__(
        self,
        resource: _Resource,
        namespace: str | None,
        match: Callable[[dict], bool],
        bookmarks: bool,
        cursor: int,
        generation: int,
    ) -> None:
        self.resource = resource
        self.namespace = namespace
        self.match = match
        self.bookmarks = bookmarks
        self.cursor = cursor
        self.generation = generation
        self.error: dict[str, Any] | None = None
        self.bookmark_requested = False
        self.close_requested = False
        self.open = False  # response headers sent: counted by open_watch_count()


@dataclasses.dataclass
class _Fault:
    remaining: int
    status: int
    path: str | None
    verb: str | None
    message: str
    retry_after: int | None


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: a burst of connections (thousands of watches opening at
    # once) would see SYNs dropped and connect timeouts, which a real API server does not cause.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], kube: KubeAPIServer) -> None:
        self.kube = kube
        self.conns: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            daemon=True,
            name=f"kube-api-conn-{client_address[1]}",
        )
        with self.conn_lock:
            self.conns.add(request)
            self.threads = [th for th in self.threads if th.is_alive()]
            self.threads.append(t)
        t.start()

    def shutdown_request(self, request: Any) -> None:
        with self.conn_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet: clients vanish in tests
        pass


class _ClientGone(Exception):
    pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-api-test"
    timeout = 120  # idle keep-alive connections
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self.server.kube._handle(self)

    def _not_allowed(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.kube._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = _not_allowed

    # -- response helpers
    def send_json(self, code: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def start_chunked(self, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.flush()

    def send_chunk(self, payload: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
            self.wfile.flush()
        except OSError as e:
            raise _ClientGone from e

    def end_chunked(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError as e:
            raise _ClientGone from e

    def client_gone(self) -> bool:
        """True once the client closed the connection (it sends nothing while it reads a watch).

        ``poll``, not ``select.select``, where there is one: select cannot take descriptors above 1023
        (ValueError), which would end every watch at once on a server holding a thousand connections."""
        try:
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(self.connection, select.POLLIN)
                readable = bool(poller.poll(0))
            else:
                readable = bool(select.select([self.connection], [], [], 0)[0])
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class KubeAPIServer:
    """An in-process Kubernetes API server for EndpointSlices, Endpoints and Services (see module doc).

    Use as a context manager or call :meth:`start` / :meth:`stop`; ``port=0`` picks a free port which
    is kept across restarts. State (objects, resourceVersions, event log) survives :meth:`stop`.
    """

    # Builders, also reachable from an instance: ``kube.apply(kube.endpoint_slice(...))``.
    endpoint = staticmethod(endpoint)
    endpoint_slice = staticmethod(endpoint_slice)
    service = staticmethod(service)
    endpoints = staticmethod(endpoints)

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        bookmark_interval: float = 1.0,
        max_watch_seconds: float = 300.0,
        expired_watch: str = "http",
        initial_resource_version: int = 1000,
    ) -> None:
        """``expired_watch``: how a WATCH from a compacted resourceVersion fails: ``"http"`` (HTTP 410
        Status response) or ``"event"`` (HTTP 200 then an ERROR event with a 410 Status, as kube-apiserver's
        watch cache does). ``max_watch_seconds`` ends watches without ``timeoutSeconds`` cleanly (the real
        server uses 30-60 min)."""
        if expired_watch not in ("http", "event"):
            raise ValueError("expired_watch must be 'http' or 'event'")
        self.host = host
        self._port = port
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = max_watch_seconds
        self.expired_watch = expired_watch
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._rv = initial_resource_version
        self._compacted_rv = initial_resource_version
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {p: {} for p in _RESOURCES}
        self._events: dict[str, list[_Event]] = {p: [] for p in _RESOURCES}
        self._event_rvs: dict[str, list[int]] = {p: [] for p in _RESOURCES}
        self._watchers: set[_Watcher] = set()
        self._requests: list[RequestRecord] = []
        self._counts: Counter[tuple[str, str | None]] = Counter()
        self._faults: list[_Fault] = []
        self._delay = 0.0
        self._generation = 0
        self._running = False
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stopped.set()
        self._abrupt = False

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        with self._lock:
            return self._running

    def start(self) -> KubeAPIServer:
        """Start serving (again) on the same port; a no-op when already running."""
        with self._lock:
            if self._running:
                return self
        httpd = None
        deadline = time.monotonic() + 5.0
        while httpd is None:  # the old listening socket may take a moment to go away
            try:
                httpd = _HTTPServer((self.host, self._port), self)
            except OSError:
                if self._port == 0 or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        with self._lock:
            self._port = httpd.server_address[1]
            self._httpd = httpd
            self._generation += 1
            self._running = True
            self._stopped = threading.Event()
        self._serve_thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="kube-api-serve"
        )
        self._serve_thread.start()
        return self

    def stop(self, abrupt: bool = False, timeout: float = 5.0) -> None:
        """Stop serving: refuse new connections, end open watches and join the connection threads.

        Watches end cleanly (terminating chunk) unless ``abrupt``, when their connections are just cut.
        Objects, resourceVersions and the event log are kept for a later :meth:`start`.
        """
        with self._cond:
            if not self._running:
                return
            self._running = False
            generation = self._generation
            self._abrupt = abrupt
            self._stopped.set()
            self._cond.notify_all()
            httpd, self._httpd = self._httpd, None
        assert httpd is not None
        httpd.shutdown()
        httpd.socket.close()
        if self._serve_thread is not None:
            self._serve_thread.join(timeout)
        deadline = time.monotonic() + timeout
        if not abrupt:  # let the watches of this generation write their last chunk
            with self._cond:
                while any(w.generation == generation for w in self._watchers):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
        with httpd.conn_lock:
            conns, threads = list(httpd.conns), list(httpd.threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    close = stop

    def __enter__(self) -> KubeAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state ---------------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The current (latest) global resourceVersion."""
        with self._lock:
            return self._rv

    @property
    def compacted_resource_version(self) -> int:
        with self._lock:
            return self._compacted_rv

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace an object (``kind`` and ``metadata.name`` required; namespace defaults to
        ``default``). Bumps the resourceVersion and emits ADDED/MODIFIED, or nothing if nothing changed.
        Returns the stored object (a copy)."""
        res = _resource(obj.get("kind", ""))
        new = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError("metadata.name is required")
        meta.setdefault("namespace", "default")
        new["kind"], new["apiVersion"] = res.kind, res.api_version
        if res.plural == "endpointslices":
            if not new.get("addressType"):
                raise ValueError("EndpointSlice.addressType is required")
            new.setdefault("endpoints", [])
            new.setdefault("ports", [])
        key = (meta["namespace"], meta["name"])
        with self._cond:
            old = self._objects[res.plural].get(key)
            if old is not None:
                if _content(old) == _content(new):
                    return copy.deepcopy(old)
                for f in ("uid", "creationTimestamp"):
                    meta[f] = old["metadata"][f]
                if "generation" in old["metadata"]:
                    meta["generation"] = old["metadata"]["generation"] + 1
            else:
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = _now()
                meta.pop("generation", None)
                if res.plural in ("endpointslices", "services"):
                    meta["generation"] = 1
            for f in ("resourceVersion", "managedFields", "selfLink", "deletionTimestamp"):
                meta.pop(f, None)
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            self._objects[res.plural][key] = new
            self._record_event(res, "ADDED" if old is None else "MODIFIED", new, old)
            return copy.deepcopy(new)

    def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """Delete an object (emits DELETED with a new resourceVersion); returns it, or None if missing."""
        res = _resource(kind)
        with self._cond:
            old = self._objects[res.plural].pop((namespace, name), None)
            if old is None:
                return None
            self._rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._record_event(res, "DELETED", gone, None)
            return copy.deepcopy(gone)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        res = _resource(kind)
        with self._lock:
            obj = self._objects[res.plural].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, kind: str, namespace: str | None = None, label_selector: str | None = None) -> list[dict]:
        res = _resource(kind)
        match = parse_label_selector(label_selector)
        with self._lock:
            return [
                copy.deepcopy(o)
                for (ns, _), o in sorted(self._objects[res.plural].items())
                if (namespace is None or ns == namespace) and match(o["metadata"].get("labels") or {})
            ]

    def clear(self) -> None:
        """Delete every object (with DELETED events)."""
        with self._lock:
            items = [
                (r.kind, ns, n) for r in _RESOURCES.values() for (ns, n) in list(self._objects[r.plural])
            ]
        for kind, ns, name in items:
            self.delete(kind, ns, name)

    def compact(self) -> int:
        """Move the compaction point to the current resourceVersion: WATCHes from older versions get 410.
        Returns the compaction point."""
        with self._cond:
            self._compacted_rv = self._rv
            for plural in _RESOURCES:
                keep_after = min(
                    [self._compacted_rv] + [w.cursor for w in self._watchers if w.resource.plural == plural]
                )
                cut = bisect.bisect_right(self._event_rvs[plural], keep_after)
                del self._events[plural][:cut]
                del self._event_rvs[plural][:cut]
            return self._compacted_rv

    def _record_event(self, res: _Resource, type_: str, obj: dict, prev: dict | None) -> None:
        # called with the lock held, self._rv already bumped to obj's resourceVersion
        self._events[res.plural].append(_Event(self._rv, type_, copy.deepcopy(obj), copy.deepcopy(prev)))
        self._event_rvs[res.plural].append(self._rv)
        self._cond.notify_all()

    # -- faults --------------------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        path: str | None = None,
        message: str | None = None,
        retry_after: int | None = None,
        verb: str | None = None,
    ) -> None:
        """Answer the next ``n`` requests (whose URL path contains ``path`` and whose verb is ``verb``
        - "list", "watch", "get" - if given) with ``status`` and a Status body. ``retry_after`` adds a
        Retry-After header (the client retries those only with ``client_go_retries``). Faults are matched
        in the order they were added."""
        with self._lock:
            self._faults.append(
                _Fault(n, status, path, verb, message or f"injected failure ({status})", retry_after)
            )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._delay = 0.0

    def set_delay(self, seconds: float) -> None:
        """Delay every response by ``seconds`` (0 to turn off); watches are delayed before their headers."""
        with self._lock:
            self._delay = max(0.0, float(seconds))

    def inject_watch_error(
        self,
        code: int = 410,
        message: str | None = None,
        reason: str | None = None,
        resource: str | None = None,
    ) -> int:
        """Send an ERROR event with a Status of ``code`` on every open watch (of ``resource``, a kind or
        plural, if given) and end those streams, as the API server does. Returns how many got it."""
        plural = _resource(resource).plural if resource else None
        status = status_object(
            code,
            message or ("too old resource version" if code == 410 else f"injected error ({code})"),
            reason,
        )
        return self._poke(plural, lambda w: setattr(w, "error", status))

    def bookmark(self, resource: str | None = None) -> int:
        """Make every open watch that allowed bookmarks send a BOOKMARK now. Returns how many will."""
        plural = _resource(resource).plural if resource else None
        return self._poke(plural, lambda w: setattr(w, "bookmark_requested", True), only_bookmarks=True)

    def close_watches(self, resource: str | None = None) -> int:
        """End open watches cleanly (as a server-side timeout does). Returns how many."""
        plural = _resource(resource).plural if resource else None
        return self._poke(plural, lambda w: setattr(w, "close_requested", True))

    def _poke(
        self, plural: str | None, action: Callable[[_Watcher], None], only_bookmarks: bool = False
    ) -> int:
        with self._cond:
            n = 0
            for w in self._watchers:
                if (plural is None or w.resource.plural == plural) and (w.bookmarks or not only_bookmarks):
                    action(w)
                    n += 1
            self._cond.notify_all()
            return n

    # -- observation ---------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received so far (a copy), oldest first."""
        with self._lock:
            return list(self._requests)

    def request_count(self, verb: str | None = None, resource: str | None = None) -> int:
        """Requests seen with ``verb`` ("list", "watch", "get", "other") and/or ``resource`` (kind/plural)."""
        plural = _resource(resource).plural if resource else None
        with self._lock:
            return sum(
                c
                for (v, p), c in self._counts.items()
                if (verb is None or v == verb) and (plural is None or p == plural)
            )

    def reset_counters(self) -> None:
        with self._lock:
            self._requests.clear()
            self._counts.clear()

    def open_watch_count(self, resource: str | None = None, namespace: str | None = None) -> int:
        """Watches currently streaming: from their response headers until the stream ends or the client
        goes away (noticed within ~50 ms even on an idle stream)."""
        plural = _resource(resource).plural if resource else None
        with self._lock:
            return self._open_watches(plural, namespace)

    def _open_watches(self, plural: str | None, namespace: str | None) -> int:
        return sum(
            1
            for w in self._watchers
            if w.open
            and (plural is None or w.resource.plural == plural)
            and (namespace is None or w.namespace == namespace)
        )

    def wait_for_open_watches(
        self, n: int, timeout: float = 5.0, resource: str | None = None, namespace: str | None = None
    ) -> bool:
        """Wait until exactly ``n`` watches (of ``resource`` / ``namespace``) are open; False on timeout."""
        plural = _resource(resource).plural if resource else None
        return self.wait_until(lambda: self._open_watches(plural, namespace) == n, timeout)

    def wait_for_requests(
        self, n: int, verb: str | None = None, resource: str | None = None, timeout: float = 5.0
    ) -> bool:
        """Wait until at least ``n`` matching requests were seen; False on timeout."""
        return self.wait_until(lambda: self.request_count(verb, resource) >= n, timeout)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait (on the server's condition, woken by every request, event and watch change) until
        ``predicate()`` (called with the lock held) is true; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    # -- HTTP ----------------------------------------------------------------------------------------

    def _handle(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        m = _ROUTE.match(split.path)
        res = None
        if m and _RESOURCES[m["plural"]].prefix == m["prefix"]:
            res = _RESOURCES[m["plural"]]
        ns, name = (m["ns"], m["name"]) if res and m else (None, None)
        is_watch = query.get("watch", "").lower() in ("true", "1")
        if h.command != "GET" or res is None:
            verb = "other"
        elif name:
            verb = "get"
        else:
            verb = "watch" if is_watch else "list"
        record = RequestRecord(
            h.command, split.path, query, verb, res.plural if res else None, ns, name, time.time()
        )
        with self._cond:
            self._requests.append(record)
            self._counts[(verb, record.resource)] += 1
            fault = self._take_fault(split.path, verb)
            delay, stopped = self._delay, self._stopped
            self._cond.notify_all()
        if delay and stopped.wait(delay):
            h.close_connection = True
            return
        headers: dict[str, str] = {}
        if res is not None and res.plural == "endpoints":
            headers["Warning"] = (
                '299 - "v1 Endpoints is deprecated in v1.33+; use discovery.k8s.io/v1 EndpointSlice"'
            )
        if fault is not None:
            if fault.retry_after is not None:
                headers["Retry-After"] = str(fault.retry_after)
            h.send_json(fault.status, status_object(fault.status, fault.message), headers)
            return
        if split.path in ("/healthz", "/livez", "/readyz"):
            data = b"ok"
            h.send_response(200)
            h.send_header("Content-Type", "text/plain")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        if split.path == "/version":
            h.send_json(200, {"major": "1", "minor": "34", "gitVersion": "v1.34.0-kube-api-test"})
            return
        if res is None:
            h.send_json(404, status_object(404, "the server could not find the requested resource"))
            return
        if h.command != "GET":
            h.send_json(405, status_object(405, f"{h.command} is not supported by the test API server"))
            return
        try:
            label_match = parse_label_selector(query.get("labelSelector"))
            field_match = parse_field_selector(query.get("fieldSelector"))
        except SelectorError as e:
            h.send_json(400, status_object(400, str(e)), headers)
            return
        if name:
            self._serve_get(h, res, ns, name, headers)
            return

        def match(obj: dict) -> bool:
            meta = obj.get("metadata", {})
            return (
                (ns is None or meta.get("namespace") == ns)
                and label_match(meta.get("labels") or {})
                and field_match(obj)
            )

        if is_watch:
            self._serve_watch(h, res, ns, match, query, headers)
        else:
            self._serve_list(h, res, match, headers)

    def _take_fault(self, path: str, verb: str) -> _Fault | None:
        for f in self._faults:
            if (f.path is None or f.path in path) and (f.verb is None or f.verb == verb):
                f.remaining -= 1
                if f.remaining <= 0:
                    self._faults.remove(f)
                return f
        return None

    def _serve_get(self, h: _Handler, res: _Resource, ns: str | None, name: str, headers: dict) -> None:
        with self._lock:
            obj = self._objects[res.plural].get((ns or "", name)) if ns else None
            obj = copy.deepcopy(obj)
        if obj is None:
            h.send_json(
                404,
                status_object(
                    404, f'{res.plural} "{name}" not found', details={"name": name, "kind": res.plural}
                ),
                headers,
            )
        else:
            h.send_json(200, obj, headers)

    def _serve_list(self, h: _Handler, res: _Resource, match: Callable[[dict], bool], headers: dict) -> None:
        with self._lock:
            items = [copy.deepcopy(o) for _, o in sorted(self._objects[res.plural].items()) if match(o)]
            rv = self._rv
        for o in items:  # like the real server: list items carry no kind/apiVersion
            o.pop("kind", None)
            o.pop("apiVersion", None)
        h.send_json(
            200,
            {
                "kind": f"{res.kind}List",
                "apiVersion": res.api_version,
                "metadata": {"resourceVersion": str(rv)},
                "items": items,
            },
            headers,
        )

    def _serve_watch(
        self,
        h: _Handler,
        res: _Resource,
        ns: str | None,
        match: Callable[[dict], bool],
        query: dict[str, str],
        headers: dict,
    ) -> None:
        rv_param = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        send_initial = query.get("sendInitialEvents", "").lower() in ("true", "1")
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        except ValueError:
            h.send_json(400, status_object(400, "invalid timeoutSeconds"), headers)
            return
        expired: dict | None = None
        with self._cond:
            if rv_param in ("", "0"):
                cursor = self._rv
                initial = [copy.deepcopy(o) for _, o in sorted(self._objects[res.plural].items()) if match(o)]
            else:
                try:
                    cursor = int(rv_param)
                except ValueError:
                    h.send_json(400, status_object(400, f"invalid resource version: {rv_param!r}"), headers)
                    return
                initial = []
                if cursor < self._compacted_rv:
                    expired = status_object(
                        410, f"too old resource version: {cursor} ({self._compacted_rv})", "Expired"
                    )
            if expired is None or self.expired_watch == "event":
                watcher = _Watcher(res, ns, match, bookmarks, cursor, self._generation)
                self._watchers.add(watcher)
                self._cond.notify_all()
        if expired is not None and self.expired_watch == "http":
            h.send_json(410, expired, headers)
            return
        try:
            h.start_chunked(headers)
            with self._cond:
                watcher.open = True
                self._cond.notify_all()
            if expired is not None:
                self._send_event(h, "ERROR", expired)
            else:
                for obj in initial:
                    self._send_event(h, "ADDED", obj)
                if bookmarks and send_initial and rv_param in ("", "0"):
                    self._send_event(h, "BOOKMARK", self._bookmark_object(res, cursor, initial_end=True))
                self._stream(h, watcher, timeout)
            if self._can_finish(watcher):
                h.end_chunked()
            if not self._serving(watcher):
                h.close_connection = True
        except (_ClientGone, OSError):
            h.close_connection = True
        finally:
            with self._cond:
                self._watchers.discard(watcher)
                self._cond.notify_all()

    def _serving(self, w: _Watcher) -> bool:
        with self._lock:
            return self._running and w.generation == self._generation

    def _can_finish(self, w: _Watcher) -> bool:
        """False when the server stopped abruptly (cut the stream without its last chunk)."""
        return self._serving(w) or not self._abrupt

    def _stream(self, h: _Handler, w: _Watcher, timeout: float | None) -> None:
        res = w.resource
        now = time.monotonic()
        limit = self.max_watch_seconds if timeout is None else min(timeout, self.max_watch_seconds)
        deadline = now + limit
        next_bookmark = now + self.bookmark_interval if w.bookmarks else float("inf")
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if not self._running or w.generation != self._generation:
                        return
                    start = bisect.bisect_right(self._event_rvs[res.plural], w.cursor)
                    pending = self._events[res.plural][start:]
                    synced = self._rv
                    if pending or w.error or w.close_requested or w.bookmark_requested:
                        break
                    if now >= deadline or now >= next_bookmark:
                        break
                    self._cond.wait(min(_POLL, deadline - now, max(0.0, next_bookmark - now)))
                    if h.client_gone():
                        return
                w.cursor = synced
                error, w.error = w.error, None
                close = w.close_requested
                want_bookmark = w.bookmark_requested or (w.bookmarks and now >= next_bookmark)
                w.bookmark_requested = False
            for ev in pending:
                out = _filter_event(ev, w.match)
                if out is not None:
                    self._send_event(h, out[0], out[1])
            if error is not None:
                self._send_event(h, "ERROR", error)
                return
            if want_bookmark and w.bookmarks:
                self._send_event(h, "BOOKMARK", self._bookmark_object(res, synced))
                next_bookmark = time.monotonic() + self.bookmark_interval
            if close or time.monotonic() >= deadline:
                return

    @staticmethod
    def _bookmark_object(res: _Resource, rv: int, initial_end: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if initial_end:
            meta["annotations"] = {INITIAL_EVENTS_END: "true"}
        return {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}

    @staticmethod
    def _send_event(h: _Handler, type_: str, obj: dict[str, Any]) -> None:
        h.send_chunk(json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n")


def _filter_event(ev: _Event, match: Callable[[dict], bool]) -> tuple[str, dict] | None:
    """What a watcher with predicate ``match`` sees of an event (real-server semantics for selectors)."""
    now = match(ev.obj)
    if ev.type == "MODIFIED":
        before = ev.prev is not None and match(ev.prev)
        if now and before:
            return "MODIFIED", ev.obj
        if now:
            return "ADDED", ev.obj
        if before:
            return "DELETED", ev.obj
        return None
    return (ev.type, ev.obj) if now else None


def _content(obj: Mapping[str, Any]) -> dict[str, Any]:
    c = copy.deepcopy(dict(obj))
    meta = c.get("metadata", {})
    for f in _SERVER_FIELDS:
        meta.pop(f, None)
    return c


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
