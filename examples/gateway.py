"""A REST gateway for the Greet service: ``POST /greet`` with JSON, answered by a Greet pod via the lookaside.

    curl -s -X POST localhost:8081/greet -d '{"first_name": "Ada", "last_name": "Lovelace"}'
    {"result": "Hello Ada Lovelace from 10.0.0.7:50051"}

Errors are JSON too (``{"error": "..."}``): 400 for a malformed request, 404 for an unknown path (or an
unknown Greet Service), 405 for a wrong method, 503 when no backend (or the lookaside) is reachable, 504 when
the backend does not answer in time. Configured by flags or the environment (as the Kubernetes manifests
do): ``GATEWAY_PORT``, ``LOOKASIDE_ADDR``, ``GREET_SERVICE``, ``GREET_NAMESPACE``.
Run: ``python -m examples.gateway --port 8081 --lookaside 127.0.0.1:50055``
(or ``lookaside-gateway``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

import lookaside_grpc
from examples.greet import greet_pb2, greet_pb2_grpc

log = logging.getLogger("examples.gateway")

MAX_BODY = 64 * 1024

#: gRPC status -> HTTP status (the usual google.rpc mapping, as grpc-gateway uses).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class BadRequest(ValueError):
    """The request body is not a usable Greeting."""


def parse_greeting(body: bytes) -> greet_pb2.GreetingRequest:
    """A GreetingRequest from a JSON body ``{"first_name": str, "last_name": str}`` (the names of its
    ``greeting``); raise BadRequest saying why."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object, not {type(data).__name__}")
    unknown = sorted(set(data) - {"first_name", "last_name"})
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    names = {}
    for field in ("first_name", "last_name"):
        if field not in data:
            raise BadRequest(f"missing field {field!r}")
        if not isinstance(data[field], str):
            raise BadRequest(f"field {field!r} must be a string, not {type(data[field]).__name__}")
        names[field] = data[field]
    return greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(**names))


class Gateway:
    """Turns ``POST /greet`` bodies into Greet calls over a lookaside channel (thread-safe)."""

    def __init__(self, stub: greet_pb2_grpc.GreetServiceStub, timeout: float = 5.0) -> None:
        self.stub = stub
        self.timeout = timeout

    def greet(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """HTTP status and JSON answer for one request body."""
        try:
            request = parse_greeting(body)
        except BadRequest as e:
            return 400, {"error": str(e)}
        try:
            reply = self.stub.Greet(request, timeout=self.timeout)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            status = HTTP_STATUS.get(code, 500)
            log.warning("Greet failed: %s: %s -> HTTP %d", code.name, details, status)
            return status, {"error": f"{code.name}: {details}", "grpc_status": code.name}
        return 200, {"result": reply.result}


def make_handler(gateway: Gateway) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to ``gateway``."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "greet-gateway"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            log.info("%s " + format, self.address_string(), *args)

        def _send(self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            body = (json.dumps(data) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self) -> str | None:
            path = self.path.split("?", 1)[0]
            if path in ("/greet", "/healthz"):
                return path
            self._send(404, {"error": f"no such path {path!r}; POST /greet"})
            return None

        def _read_body(self) -> bytes | None:
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                self._send(411, {"error": "send a Content-Length (chunked bodies are not supported)"})
                return None
            try:
                size = int(length or "0")
            except ValueError:
                self.close_connection = True
                self._send(400, {"error": f"bad Content-Length {length!r}"})
                return None
            if size > MAX_BODY:
                self.close_connection = True
                self._send(413, {"error": f"body larger than {MAX_BODY} bytes"})
                return None
            return self.rfile.read(size)

        def do_POST(self) -> None:
            path = self._route()
            if path is None:
                return
            if path != "/greet":
                self._send(
                    405, {"error": f"method POST not allowed on {path}; use GET"}, {"Allow": "GET, HEAD"}
                )
                return
            body = self._read_body()
            if body is None:
                return
            status, data = gateway.greet(body)
            self._send(status, data)

        def do_GET(self) -> None:
            path = self._route()
            if path is None:
                return
            if path == "/healthz":
                self._send(200, {"status": "ok"})
                return
            self._send(
                405, {"error": f"method {self.command} not allowed on /greet; use POST"}, {"Allow": "POST"}
            )

        do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    return Handler


class GatewayServer(ThreadingHTTPServer):
    daemon_threads = True


def serve(
    lookaside: str, service: str, namespace: str, host: str = "127.0.0.1", port: int = 0, timeout: float = 5.0
) -> tuple[GatewayServer, grpc.Channel]:
    """Bind the gateway (0 = any free port) and serve it from a daemon thread; return the server and channel.

    Stop with ``server.shutdown(); server.server_close(); channel.close()``.
    """
    channel = lookaside_grpc.channel(service, namespace=namespace, lookaside=lookaside)
    try:
        server = GatewayServer(
            (host, port), make_handler(Gateway(greet_pb2_grpc.GreetServiceStub(channel), timeout))
        )
    except BaseException:
        channel.close()
        raise
    threading.Thread(target=server.serve_forever, name="greet-gateway", daemon=True).start()
    return server, channel


def main(argv: list[str] | None = None) -> None:
    """Run the gateway until SIGTERM/SIGINT."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"python -m examples.gateway (lookaside-grpc {lookaside_grpc.__version__})",
    )
    parser.add_argument(
        "--host", default=env("GATEWAY_HOST", "0.0.0.0"), help="address to bind (GATEWAY_HOST)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env("GATEWAY_PORT", "8081") or 8081),
        help="port to bind, 0 = any free port (GATEWAY_PORT; default %(default)s)",
    )
    parser.add_argument(
        "--lookaside",
        default=env("LOOKASIDE_ADDR", "127.0.0.1:50055"),
        help="host:port of the lookaside server (LOOKASIDE_ADDR; default %(default)s)",
    )
    parser.add_argument(
        "--service", default=env("GREET_SERVICE", "greet"), help="Greet Service (GREET_SERVICE)"
    )
    parser.add_argument(
        "--namespace",
        default=env("GREET_NAMESPACE", "default"),
        help="namespace of the Greet Service (GREET_NAMESPACE)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(env("GATEWAY_TIMEOUT", "5") or 5),
        help="seconds per Greet call (GATEWAY_TIMEOUT; default %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server, channel = serve(
            args.lookaside, args.service, args.namespace, args.host, args.port, args.timeout
        )
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        sys.exit(1)
    print(json.dumps({"listening": f"{args.host}:{server.server_address[1]}"}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    server.server_close()
    channel.close()


if __name__ == "__main__":
    main()
