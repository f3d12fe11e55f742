"""Client test kit: a small real lookaside server whose endpoint set and faults the test controls, plus
Greet backends and bounded polling helpers."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import grpc

from examples.greet import greet_pb2, greet_pb2_grpc
from examples.greet.server import GreetServicer, serve
from lookaside_grpc import protocol

EndpointSpec = str | tuple[str, int] | tuple[str, int, str]


def _to_proto(spec: EndpointSpec) -> protocol.Endpoint:
    if isinstance(spec, str):
        host, _, port = spec.rpartition(":")
        return protocol.Endpoint(ip=host.strip("[]"), port=int(port))
    return protocol.Endpoint(ip=spec[0], port=spec[1], zone=spec[2] if len(spec) > 2 else "")


class FakeLookaside(protocol.LookasideServicer):
    """Serves Resolve (round robin over the list) and Watch (full set on subscribe and on every change)."""

    def __init__(self, endpoints: Sequence[EndpointSpec] = ()) -> None:
        self._cond = threading.Condition()
        self._endpoints = [_to_proto(e) for e in endpoints]
        self.version = 1
        self._rr = itertools.count()
        self._generation = 0  # bumped by break_watches()
        self._stopping = False
        self.resolve_calls = 0
        self.watch_calls = 0
        self.active_watches = 0
        self.requests: list[protocol.Request | protocol.WatchRequest] = []
        #: (code, details) every Resolve / Watch fails with, while set.
        self.resolve_error: tuple[grpc.StatusCode, str] | None = None
        self.watch_error: tuple[grpc.StatusCode, str] | None = None

    def set_endpoints(self, endpoints: Sequence[EndpointSpec]) -> None:
        """Replace the set and push it to every Watch subscriber."""
        with self._cond:
            self._endpoints = [_to_proto(e) for e in endpoints]
            self.version += 1
            self._cond.notify_all()

    def break_watches(self) -> None:
        """End every open Watch stream with UNAVAILABLE (clients should reconnect)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def stop(self) -> None:
        """Release Watch handler threads (call before stopping the server)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "resolve": self.resolve_calls,
                "watch": self.watch_calls,
                "active_watches": self.active_watches,
            }

    def Resolve(self, request: protocol.Request, context: grpc.ServicerContext) -> protocol.Response:
        with self._cond:
            self.resolve_calls += 1
            self.requests.append(request)
            err = self.resolve_error
            eps = list(self._endpoints)
            version = self.version
        if err is not None:
            context.abort(*err)
        if not eps:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"no endpoints for {request.service}")
        picks = [eps[next(self._rr) % len(eps)] for _ in range(max(1, request.count))]
        return protocol.Response(address=picks[0].ip, port=picks[0].port, endpoints=picks, version=version)

    def Watch(
        self, request: protocol.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[protocol.EndpointSet]:
        with self._cond:
            self.watch_calls += 1
            self.requests.append(request)
            err = self.watch_error
            generation = self._generation
        if err is not None:
            context.abort(*err)
        context.add_callback(self._wake)
        with self._cond:
            self.active_watches += 1
        try:
            sent = -1
            while context.is_active():
                with self._cond:
                    self._cond.wait_for(
                        lambda sent=sent: (
                            self.version != sent  # type: ignore[misc]
                            or self._generation != generation
                            or self._stopping
                            or not context.is_active()
                        ),
                        timeout=1.0,
                    )
                    if self._stopping:
                        return
                    if self._generation != generation:
                        broken = True
                    else:
                        broken = False
                        eps = list(self._endpoints)
                        version = self.version
                if broken:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "watch broken by test")
                if version != sent:
                    sent = version
                    yield protocol.EndpointSet(
                        service=request.service, namespace=request.namespace, endpoints=eps, version=version
                    )
        finally:
            with self._cond:
                self.active_watches -= 1

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class RunningLookaside:
    """A FakeLookaside served on 127.0.0.1 (context manager)."""

    def __init__(self, endpoints: Sequence[EndpointSpec] = ()) -> None:
        self.servicer = FakeLookaside(endpoints)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        protocol.add_LookasideServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.servicer.stop()
        self.server.stop(grace=None).wait(5)

    def __enter__(self) -> RunningLookaside:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def unused_address() -> str:
    """A 127.0.0.1 address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class EchoServicer(GreetServicer):
    """Greet that echoes the ``x-test`` request metadata and sends ``x-served-by`` trailing metadata."""

    def Greet(
        self, request: greet_pb2.GreetingRequest, context: grpc.ServicerContext
    ) -> greet_pb2.GreetingResponse:
        md = dict(context.invocation_metadata())
        context.set_trailing_metadata((("x-served-by", self.name),))
        greeting = super().Greet(request, context).result
        return greet_pb2.GreetingResponse(result=f"{md.get('x-test', '')} {greeting}")


class Backends:
    """N Greet servers on 127.0.0.1 (context manager)."""

    def __init__(self, n: int, delay: float = 0.0, echo: bool = False) -> None:
        self.servers: list[grpc.Server] = []
        self.servicers: list[GreetServicer] = []
        self.addresses: list[str] = []
        for _ in range(n):
            if echo:
                server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
                port = server.add_insecure_port("127.0.0.1:0")
                servicer: GreetServicer = EchoServicer(f"127.0.0.1:{port}", delay=delay)
                greet_pb2_grpc.add_GreetServiceServicer_to_server(servicer, server)
                server.start()
            else:
                server, servicer, port = serve(0, delay=delay)
            self.servers.append(server)
            self.servicers.append(servicer)
            self.addresses.append(f"127.0.0.1:{port}")

    def calls(self) -> list[int]:
        return [int(s.stats()["calls"]) for s in self.servicers]  # type: ignore[call-overload]

    def connections(self) -> list[int]:
        return [int(s.stats()["connections"]) for s in self.servicers]  # type: ignore[call-overload]

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=None)

    def __enter__(self) -> Backends:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll ``cond`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def greeting_request(first_name: str, last_name: str = "") -> greet_pb2.GreetingRequest:
    """The Greet request of the original design: the names wrapped in its ``greeting``."""
    return greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name=first_name, last_name=last_name))


def greetings(*names: str) -> Iterator[greet_pb2.GreetingRequest]:
    for name in names:
        yield greeting_request(name, "X")


def req(name: str = "Ada") -> greet_pb2.GreetingRequest:
    return greeting_request(name, "L")
