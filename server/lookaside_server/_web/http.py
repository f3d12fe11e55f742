"""The server's HTTP listener (status page, ``/status.json``, ``/healthz``, ``/metrics``) on the server's own
event loop, served by aiohttp's HTTP/1.1 protocol with a tiny exact-path route table
(:meth:`HttpServer.route`).

Every resource is bounded (:class:`HttpLimits`):

* **connections**: at most ``max_connections`` open at once. When a new one arrives at the cap, the oldest
  connection that is not serving a request (idle between requests, or still sending its request headers)
  is closed to make room, so idle or half-open sockets cannot lock out a probe of ``/healthz``; if every
  connection is busy the new one is closed at once. Both count as ``http_max_connections`` limit hits.
* **headers**: a request's headers must be complete within ``header_timeout`` seconds of its first byte (or
  of the connection opening); a slower client is disconnected (``http_header_timeout`` hits). Request line
  and header sizes are aiohttp's (8190 bytes each, at most 128 header lines; beyond: 400).
* **idle**: a keep-alive connection without a new request for ``idle_timeout`` seconds is closed.
* **bodies**: only GET and HEAD are served. Another method gets 405; a GET/HEAD with a body gets 413. Either
  way the connection is closed after the answer, so a body is never read as a further request.

Handlers run on the event loop: they may read the registry directly and must stay cheap (anything heavy
goes to a thread, see ``status_page.py`` and ``metrics.py``). A handler returns an :class:`HttpResponse`
(or an awaitable of one).
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import resource
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

#: ``lookaside_limit_hits_total{limit}`` labels of the HTTP listener.
HTTP_MAX_CONNECTIONS = "http_max_connections"
HTTP_HEADER_TIMEOUT = "http_header_timeout"
HTTP_RENDER_BUDGET = "http_render_budget"  # a request answered with an earlier rendering (render_budget.py)
HTTP_LIMITS = (HTTP_MAX_CONNECTIONS, HTTP_HEADER_TIMEOUT, HTTP_RENDER_BUDGET)

#: File descriptors the rest of the server needs besides HTTP connections (gRPC listener and connections,
#: the static file, inotify, /proc reads of the process collector, logs): below this headroom under the
#: open-file limit the connection cap is reported as too high at start.
FD_HEADROOM = 128
#: Pending connections the kernel queues before accept (no file descriptor until accepted; capped by
#: net.core.somaxconn): large, so a burst is taken (and closed at the cap) at once instead of trickling in
#: with SYN-ACK retransmissions. The accept loop takes one connection per turn of the event loop.
_BACKLOG = 1024
#: Out of file descriptors (EMFILE and the like), the accept loop pauses this long before trying again (the
#: connections wait in the kernel's queue), and says so at most every _RESOURCE_LOG_EVERY seconds.
_ACCEPT_RETRY = 0.1
_RESOURCE_LOG_EVERY = 10.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: A connection is evicted at the cap only after this long without a request in progress: one that was
#: just accepted (its request may be waiting unread in the socket) is never pushed out by the same burst.
MIN_EVICT_AGE = 0.1


@dataclass(frozen=True)
class HttpLimits:
    """Bounds of the HTTP listener (see the module docstring); times in seconds."""

    max_connections: int = 256
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    #: Fresh renders per second of each status/metrics rendering (see ``render_budget.py``).
    renders_per_second: float = 4.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.header_timeout <= 0 or self.idle_timeout <= 0:
            raise ValueError("header_timeout and idle_timeout must be positive")
        if not self.renders_per_second > 0:
            raise ValueError("renders_per_second must be positive")


@dataclass
class HttpResponse:
    """What a route handler returns."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, text: str) -> HttpResponse:
        return cls(status, text.encode(), "text/plain; charset=utf-8")


@dataclass(frozen=True)
class HttpRequest:
    """The parts of a request a handler needs (header names lower-case)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]


Handler = Callable[[HttpRequest], "HttpResponse | Awaitable[HttpResponse]"]

# Connection states.
_WAITING = "waiting"  # for the first byte of a request (idle keep-alive), idle_timeout
_HEADERS = "headers"  # request bytes arriving, header_timeout from the first one (or from accept)
_BUSY = "busy"  # a handler runs: no timer, never evicted


class _Board:
    """The open connections of one listener: counted, the not-busy ones kept oldest first for eviction."""

    def __init__(self, limits: HttpLimits, on_limit: Callable[[str], None] | None) -> None:
        self.limits = limits
        self.on_limit = on_limit
        self.open: set[_Connection] = set()
        self.evictable: OrderedDict[_Connection, None] = OrderedDict()
        self.refused = 0
        self.evicted = 0
        self.header_timeouts = 0

    def hit(self, limit: str) -> None:
        if self.on_limit is not None:
            try:
                self.on_limit(limit)
            except Exception:  # noqa: BLE001 - counting must never break serving
                log.exception("counting an HTTP limit hit failed")

    def admit(self, conn: _Connection) -> bool:
        """Room for ``conn``: evict the oldest not-busy connection at the cap; False if all are busy."""
        if len(self.open) >= self.limits.max_connections:
            self.hit(HTTP_MAX_CONNECTIONS)
            oldest = next(iter(self.evictable), None)
            if oldest is None or oldest.idle_for() < MIN_EVICT_AGE:
                self.refused += 1
                return False
            victim, _ = self.evictable.popitem(last=False)
            self.evicted += 1
            victim.drop()
        self.open.add(conn)
        return True

    def remove(self, conn: _Connection) -> None:
        self.open.discard(conn)
        self.evictable.pop(conn, None)


class _Connection(RequestHandler):  # type: ignore[misc]
    """aiohttp's HTTP/1.1 protocol plus the connection cap, header and idle timers of :class:`_Board`."""

    def __init__(self, manager: _AioServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._lb_board = manager.board
        self._lb_state = _HEADERS
        self._lb_timer: asyncio.TimerHandle | None = None
        self._lb_admitted = False
        self._lb_transport: asyncio.Transport | None = None
        self._lb_since = 0.0

    # --- the protocol -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._lb_transport = cast(asyncio.Transport, transport)
        if not self._lb_board.admit(self):
            self._lb_transport.abort()  # connection_lost follows; nothing of aiohttp's was set up
            return
        self._lb_admitted = True
        super().connection_made(transport)
        self._enter(_HEADERS)

    def data_received(self, data: bytes) -> None:
        if self._lb_state == _WAITING and data:
            self._enter(_HEADERS)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        self._lb_board.remove(self)
        if self._lb_admitted:
            self._lb_admitted = False
            super().connection_lost(exc)

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp's report of a failed request: a malformed one (the client's fault, answered 400) is
        logged at DEBUG, so garbage on the port cannot flood the log; anything else stays an error."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            log.debug("http: bad request: %s", exc)
            return
        log.error(*args, **kwargs)

    # --- states -----------------------------------------------------------------------------------------

    def request_started(self) -> None:
        """A handler starts: no timer, not evictable."""
        self._enter(_BUSY)

    def request_done(self) -> None:
        """The handler is done (its response is being written): idle timer, evictable again."""
        self._enter(_WAITING)

    def idle_for(self) -> float:
        """Seconds since the connection last became evictable (accepted, or its last request done)."""
        return asyncio.get_running_loop().time() - self._lb_since

    def drop(self) -> None:
        """Close at once (evicted, or its time is up)."""
        self._cancel_timer()
        self._lb_board.evictable.pop(self, None)
        if self._lb_transport is not None:
            self._lb_transport.abort()

    def _enter(self, state: str) -> None:
        if self._lb_transport is None or self._lb_transport.is_closing():
            return
        self._cancel_timer()
        self._lb_state = state
        loop = asyncio.get_running_loop()
        if state == _BUSY:
            self._lb_board.evictable.pop(self, None)
            return
        self._lb_since = loop.time()
        self._lb_board.evictable[self] = None
        self._lb_board.evictable.move_to_end(self)
        if state == _HEADERS:
            self._lb_timer = loop.call_later(self._lb_board.limits.header_timeout, self._header_timeout)
        else:
            self._lb_timer = loop.call_later(self._lb_board.limits.idle_timeout, self._idle_timeout)

    def _header_timeout(self) -> None:
        self._lb_timer = None
        self._lb_board.header_timeouts += 1
        self._lb_board.hit(HTTP_HEADER_TIMEOUT)
        log.debug(
            "http: request headers not complete within %s s; closing", self._lb_board.limits.header_timeout
        )
        self.drop()

    def _idle_timeout(self) -> None:
        self._lb_timer = None
        self._lb_board.evictable.pop(self, None)
        if self._lb_transport is not None:
            self._lb_transport.close()  # a FIN, not a reset: the client may have just sent a request

    def _cancel_timer(self) -> None:
        if self._lb_timer is not None:
            self._lb_timer.cancel()
            self._lb_timer = None


class _AioServer(web.Server):  # type: ignore[misc]
    """aiohttp's low-level server making :class:`_Connection` protocols."""

    def __init__(self, handler: Any, board: _Board, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.board = board

    def __call__(self) -> _Connection:
        return _Connection(self, loop=self._loop, **self._kwargs)


def _bind_host(host: str) -> tuple[str, socket.AddressFamily]:
    host = host.strip("[]")
    if host in ("", "::"):
        if socket.has_ipv6:
            return "::", socket.AF_INET6
        return "0.0.0.0", socket.AF_INET
    return host, socket.AF_INET6 if ":" in host else socket.AF_INET


def _listening_socket(host: str, port: int) -> socket.socket:
    bind, family = _bind_host(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" also accepts IPv4 (dual stack) where the OS allows it.
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:  # pragma: no cover
                pass
        sock.bind((bind, port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


_ALLOWED_BODYLESS = frozenset({"GET", "HEAD"})


class HttpServer:
    """An HTTP listener with a route table, served on the running event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        limits: HttpLimits | None = None,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self.limits = limits or HttpLimits()
        self._routes: dict[str, tuple[frozenset[str], Handler]] = {}
        self._board = _Board(self.limits, on_limit)
        self._aio: _AioServer | None = None
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        #: Times the accept loop paused for lack of file descriptors (or memory).
        self.accept_pauses = 0

    @property
    def connections(self) -> int:
        """HTTP connections open now."""
        return len(self._board.open)

    @property
    def stats(self) -> dict[str, int]:
        """Connections open, refused and evicted at the cap, closed for slow headers (since start)."""
        b = self._board
        return {
            "open": len(b.open),
            "refused": b.refused,
            "evicted": b.evicted,
            "header_timeouts": b.header_timeouts,
        }

    def limit_hit(self, limit: str) -> None:
        """Count a hit of one of this listener's limits (``lookaside_limit_hits_total{limit}``)."""
        self._board.hit(limit)

    def route(self, path: str, handler: Handler, methods: tuple[str, ...] = ("GET", "HEAD")) -> None:
        """Serve ``path`` (exact match) with ``handler`` for ``methods`` (GET/HEAD only: no bodies)."""
        if not set(methods) <= _ALLOWED_BODYLESS:
            raise ValueError(
                f"only GET and HEAD can be served, not {sorted(set(methods) - _ALLOWED_BODYLESS)}"
            )
        self._routes[path] = (frozenset(methods), handler)

    async def start(self) -> int:
        """Bind and serve on the running loop; return the bound port (raise OSError if it cannot bind)."""
        sock = _listening_socket(self.host, self.requested_port)
        self._warn_if_fds_short()
        limits = self.limits
        self._aio = _AioServer(
            self._handle,
            self._board,
            # our timers (header, idle) act first; aiohttp's own keep-alive timeout is only a backstop
            keepalive_timeout=limits.idle_timeout + limits.header_timeout + 1,
            access_log=None,
            lingering_time=0.0,
        )
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept_loop(sock), name=f"lookaside-http-accept:{sock}")
        self.port = sock.getsockname()[1]
        host = sock.getsockname()[0]
        log.info("status page on http://%s:%d/", f"[{host}]" if ":" in host else host, self.port)
        return self.port

    def _warn_if_fds_short(self) -> None:
        try:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (OSError, ValueError):  # pragma: no cover
            return
        if soft != resource.RLIM_INFINITY and self.limits.max_connections + FD_HEADROOM > soft:
            log.warning(
                "--http-max-connections %d leaves fewer than %d of the %d open files allowed for gRPC and "
                "the endpoint source; lower it or raise the open-file limit (ulimit -n)",
                self.limits.max_connections,
                FD_HEADROOM,
                soft,
            )

    async def stop(self, timeout: float = 2.0) -> None:
        """Stop listening and close every connection; idempotent."""
        accepting, self._accepting = self._accepting, None
        aio, self._aio = self._aio, None
        if accepting is None:
            return
        accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for conn in list(self._board.open):
            conn.drop()
        if aio is not None:
            try:
                await asyncio.wait_for(aio.shutdown(timeout), timeout + 1)
            except TimeoutError:  # pragma: no cover
                log.warning("http: connections did not close within %s s", timeout)

    async def _accept_loop(self, sock: socket.socket) -> None:
        """Accept connections one per turn of the loop; out of descriptors, pause and retry (never spin)."""
        loop = asyncio.get_running_loop()
        last_logged = -_RESOURCE_LOG_EVERY
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                if e.errno not in _OUT_OF_RESOURCES:
                    if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                        continue  # the client gave up before accept: nothing to do
                    log.exception("http: accept failed; the status page stops listening")
                    return
                self.accept_pauses += 1
                if loop.time() - last_logged >= _RESOURCE_LOG_EVERY:
                    last_logged = loop.time()
                    log.warning(
                        "cannot accept HTTP connections: %s; retrying every %s s (open files: "
                        "see ulimit -n and --http-max-connections)",
                        e.strerror or e,
                        _ACCEPT_RETRY,
                    )
                await asyncio.sleep(_ACCEPT_RETRY)
                continue
            try:
                conn.setblocking(False)
                await loop.connect_accepted_socket(self._aio, sock=conn)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - one connection's failure must not end the listener
                log.debug("http: could not set up an accepted connection", exc_info=True)
                conn.close()

    # --- one request ------------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        conn = request.protocol if isinstance(request.protocol, _Connection) else None
        if conn is not None:
            conn.request_started()
        try:
            resp, close = await self._answer(request)
            out = web.Response(
                status=resp.status,
                body=resp.body,
                headers={
                    "Content-Type": resp.content_type,
                    "Cache-Control": "no-store",
                    "X-Content-Type-Options": "nosniff",
                    "Server": "lookaside",
                    **resp.headers,
                },
            )
            if close:
                out.force_close()
            return out
        finally:
            if conn is not None:
                conn.request_done()

    async def _answer(self, request: web.BaseRequest) -> tuple[HttpResponse, bool]:
        """The response, and whether to close the connection after it."""
        path = request.path
        entry = self._routes.get(path)
        has_body = request.body_exists or bool(request.content_length)
        if entry is None:
            return HttpResponse.text(404, f"not found: {path}\n"), has_body
        methods, handler = entry
        if request.method not in methods:
            allowed = ", ".join(sorted(methods))
            resp = HttpResponse.text(405, f"method {request.method} not allowed; use {allowed}\n")
            resp.headers["Allow"] = allowed
            return resp, True
        if has_body:
            return HttpResponse.text(413, "request bodies are not accepted\n"), True
        req = HttpRequest(
            "GET" if request.method == "HEAD" else request.method,
            path,
            request.query_string,
            {k.lower(): v for k, v in request.headers.items()},
        )
        try:
            result = handler(req)
            if inspect.isawaitable(result):
                result = await result
        except Exception:  # noqa: BLE001 - one broken handler must not kill the listener
            log.exception("http handler for %s failed", path)
            return HttpResponse.text(500, "internal error (see the server log)\n"), False
        return result, False
