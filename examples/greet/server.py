"""The Greet backend of the original design: answers with its own address, so callers see who served them.

It also counts calls and distinct client peers (one peer per TCP connection), which the demo, the tests and
the benchmarks use to show how calls and connections spread.
Run: ``python -m examples.greet.server``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from importlib import metadata

import grpc

from examples.greet import greet_pb2, greet_pb2_grpc

log = logging.getLogger(__name__)


class GreetServicer(greet_pb2_grpc.GreetServiceServicer):
    """Greets, signs the answer with ``name`` and records who called (thread-safe)."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self._lock = threading.Lock()
        self.calls = 0
        self.peers: Counter[str] = Counter()

    def _record(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls += 1
            self.peers[context.peer()] += 1
        if self.delay:
            time.sleep(self.delay)

    def _greet(self, g: greet_pb2.Greeting) -> greet_pb2.GreetingResponse:
        return greet_pb2.GreetingResponse(result=f"Hello {g.first_name} {g.last_name} from {self.name}")

    def Greet(
        self, request: greet_pb2.GreetingRequest, context: grpc.ServicerContext
    ) -> greet_pb2.GreetingResponse:
        self._record(context)
        if request.greeting.first_name == "fail":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"asked to fail by {self.name}")
        return self._greet(request.greeting)

    def GreetManyTimes(
        self, request: greet_pb2.GreetingRequest, context: grpc.ServicerContext
    ) -> Iterator[greet_pb2.GreetingResponse]:
        self._record(context)
        for i in range(3):
            yield greet_pb2.GreetingResponse(result=f"{self._greet(request.greeting).result} #{i}")

    def LongGreet(
        self, request_iterator: Iterator[greet_pb2.GreetingRequest], context: grpc.ServicerContext
    ) -> greet_pb2.GreetingResponse:
        self._record(context)
        names = [f"{r.greeting.first_name} {r.greeting.last_name}" for r in request_iterator]
        return greet_pb2.GreetingResponse(result=f"Hello {', '.join(names)} from {self.name}")

    def GreetEveryone(
        self, request_iterator: Iterator[greet_pb2.GreetingRequest], context: grpc.ServicerContext
    ) -> Iterator[greet_pb2.GreetingResponse]:
        self._record(context)
        for r in request_iterator:
            yield self._greet(r.greeting)

    def stats(self) -> dict[str, object]:
        """Calls served and distinct client connections seen."""
        with self._lock:
            return {"name": self.name, "calls": self.calls, "connections": len(self.peers)}


def serve(
    port: int = 0, host: str = "127.0.0.1", delay: float = 0.0, max_workers: int = 32
) -> tuple[grpc.Server, GreetServicer, int]:
    """Start a Greet server on ``host:port`` (0 = any free port); return it, its servicer and the port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind Greet server to {host}:{port}")
    servicer = GreetServicer(f"{host}:{bound}", delay=delay)
    greet_pb2_grpc.add_GreetServiceServicer_to_server(servicer, server)
    server.start()
    return server, servicer, bound


def _version() -> str:
    """The installed lookaside-grpc version (this backend needs only grpcio: it may run without it)."""
    try:
        return metadata.version("lookaside-grpc")
    except metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> None:
    """Run one Greet backend until SIGTERM/SIGINT; then print its stats as one JSON line on stdout."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--version",
        action="version",
        version=f"python -m examples.greet.server (lookaside-grpc {_version()})",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of added latency per call")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server, servicer, port = serve(args.port, args.host, args.delay)
    print(json.dumps({"listening": f"{args.host}:{port}"}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()
    print(json.dumps(servicer.stats()), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
