"""The server's HTTP listener (status page, ``/status.json``, ``/healthz``; ``/metrics`` can be added).

A stdlib :class:`ThreadingHTTPServer` in a daemon thread with a tiny route table: :meth:`HttpServer.route`
adds a path. Handlers run in the listener's threads, never on the event loop: anything reading the
registry must hop onto the loop (see :meth:`LoopBridge.call`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    """The parts of a request a handler needs."""

    method: str
    path: str
    query: str
    headers: dict[str, str]


Handler = Callable[[HttpRequest], HttpResponse]


class LoopBridge:
    """Runs a coroutine on the server's event loop from a listener thread, with a timeout."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float = 5.0) -> None:
        self.loop = loop
        self.timeout = timeout

    def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run ``make()`` on the loop, return its result; raise TimeoutError, or RuntimeError (loop gone)."""

        async def run() -> T:
            return await make()

        try:
            fut = asyncio.run_coroutine_threadsafe(run(), self.loop)
        except RuntimeError as e:  # loop closed
            raise RuntimeError(f"event loop not running: {e}") from e
        try:
            return fut.result(self.timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"the server's event loop did not answer within {self.timeout} s") from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    routes: dict[str, tuple[frozenset[str], Handler]]

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # "::" also accepts IPv4 (dual stack) where the OS allows it.
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:  # pragma: no cover
                pass
        super().server_bind()


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "lookaside"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s: " + format, self.address_string(), *args)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        entry = self.server.routes.get(url.path)
        if entry is None:
            resp = HttpResponse.text(404, f"not found: {url.path}\n")
        elif self.command not in entry[0]:
            allowed = ", ".join(sorted(entry[0]))
            resp = HttpResponse.text(405, f"method {self.command} not allowed; use {allowed}\n")
            resp.headers["Allow"] = allowed
        else:
            method = "GET" if self.command == "HEAD" else self.command
            req = HttpRequest(method, url.path, url.query, {k.lower(): v for k, v in self.headers.items()})
            try:
                resp = entry[1](req)
            except Exception:  # noqa: BLE001 - one broken handler must not kill the listener
                log.exception("http handler for %s failed", url.path)
                resp = HttpResponse.text(500, "internal error (see the server log)\n")
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch


def _bind_host(host: str) -> tuple[str, socket.AddressFamily]:
    host = host.strip("[]")
    if host in ("", "::"):
        if socket.has_ipv6:
            return "::", socket.AF_INET6
        return "0.0.0.0", socket.AF_INET
    return host, socket.AF_INET6 if ":" in host else socket.AF_INET


class HttpServer:
    """An HTTP listener with a route table, served from a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self._routes: dict[str, tuple[frozenset[str], Handler]] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def route(self, path: str, handler: Handler, methods: tuple[str, ...] = ("GET", "HEAD")) -> None:
        """Serve ``path`` (exact match) with ``handler`` for ``methods``; may be called after start."""
        self._routes[path] = (frozenset(methods), handler)

    def start(self) -> int:
        """Bind and serve in a daemon thread; return the bound port (raise OSError if it cannot bind)."""
        host, family = _bind_host(self.host)

        class Bound(_Server):
            address_family = family

        server = Bound((host, self.requested_port), _RequestHandler)
        server.routes = self._routes
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"lookaside-http:{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info("status page on http://%s:%d/", f"[{host}]" if ":" in host else host, self.port)
        return self.port

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket (blocking: call it off the event loop); idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
