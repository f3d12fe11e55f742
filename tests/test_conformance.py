"""Conformance by control: gRPC's interop test cases through every client flavour, each compared with a plain
grpc channel (the control) running the same case.

The test service is the project's own ``lookaside.interop.v1.TestService`` (``lookaside_dev/interop``), whose
``test.proto`` holds only the services and imports its messages from ``messages.proto`` and ``empty.proto``,
as gRPC's own ``test.proto`` does (issue 11, item 9). Flavours: the sync factory (watch, per_call), the aio
factory (watch, per_call), the sync interceptor and the aio interceptors, all through the real lookaside
server over a static file of three 127.0.0.1 backends. The interceptors' original channel points at a fourth
backend *outside* the endpoint set, so a call that silently takes the fallback path is seen (replies are
signed by the backend that answered). Every case runs twice per flavour: on one channel shared by all cases
and on a fresh channel of its own (with its own target, so nothing is shared: a cold start).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pathlib
import queue
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

import lookaside_grpc
import lookaside_grpc.aio
from lookaside_dev.interop.server import (
    ECHO_INITIAL,
    ECHO_TRAILING,
    SERVED_BY,
    SERVICE,
    UNIMPLEMENTED_SERVICE,
    InteropBackend,
)
from lookaside_dev.interop.v1 import empty_pb2, messages_pb2, test_pb2_grpc
from lookaside_dev.silent import serve_lookaside

#: A library thread that dies of an exception (a watch thread, a timer) fails the test it happens in.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
T = TypeVar("T")
NAMESPACE = "default"
SHARED_SERVICE = "interop"
CALL_TIMEOUT = 5.0
#: how long a case may take in all (every wait in a case is bounded by this)
CASE_TIMEOUT = 15.0

INITIAL_VALUE = "test_initial_metadata_value"
TRAILING_VALUE = b"\x0a\x0b\x0a\x0b\x0a\x0b"
SPECIAL_MESSAGE = "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"
KEPT_METADATA = (ECHO_INITIAL, ECHO_TRAILING, SERVED_BY)


def mode(name: str) -> Any:
    """The public mode value: the mode objects once the library has them, else the mode string."""
    if name == "watch":
        return lookaside_grpc.Watch() if hasattr(lookaside_grpc, "Watch") else "watch"
    return lookaside_grpc.PerCall() if hasattr(lookaside_grpc, "PerCall") else "per_call"


def payload(size: int) -> messages_pb2.Payload:
    return messages_pb2.Payload(body=b"\0" * size)


def streaming_request(
    *sizes: int, body: int = 0, status: tuple[int, str] | None = None, interval_us: int = 0
) -> Any:
    return messages_pb2.StreamingOutputCallRequest(
        response_parameters=[messages_pb2.ResponseParameters(size=s, interval_us=interval_us) for s in sizes],
        payload=payload(body),
        response_status=messages_pb2.EchoStatus(code=status[0], message=status[1]) if status else None,
    )


# --------------------------------------------------------------------------------------------- the world


class LoopThread:
    """An asyncio loop in a daemon thread: aio channels shared across tests live on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="conformance-aio", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = CASE_TIMEOUT) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class World:
    backends: list[InteropBackend]
    fallback: InteropBackend
    lookaside: str
    loop: LoopThread
    fresh_names: Iterator[str]

    @property
    def balanced(self) -> set[str]:
        return {b.address for b in self.backends}

    def tag(self, server_id: str) -> str:
        """A reply's signature, normalised: any backend of the endpoint set is ``backend``; anything else
        (the interceptors' fallback channel) stays as it is, so it differs from the control."""
        return "backend" if server_id in self.balanced else server_id


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    backends = [InteropBackend() for _ in range(3)]
    fallback = InteropBackend()
    lookaside = serve_lookaside([b.address for b in backends])
    loop = LoopThread()
    names = (f"{SHARED_SERVICE}-{i}" for i in itertools.count())
    yield World(backends, fallback, lookaside.address, loop, names)
    loop.stop()
    lookaside.stop()
    for backend in [*backends, fallback]:
        backend.stop()


# --------------------------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """What a caller can observe of one call."""

    code: grpc.StatusCode | None
    details: str | None
    initial: tuple[tuple[str, Any], ...] = ()
    trailing: tuple[tuple[str, Any], ...] = ()
    messages: tuple[Any, ...] = ()
    cancelled: tuple[Any, ...] = field(default=())


def keep(world: World, metadata: Sequence[tuple[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
    """The metadata the test service echoes or signs (transport headers differ by path and are dropped)."""
    kept = []
    for key, value in metadata or ():
        if key in KEPT_METADATA:
            kept.append((key, world.tag(value) if key == SERVED_BY else value))
    return tuple(sorted(kept))


def describe(world: World, message: Any) -> tuple[Any, ...]:
    """A reply's contents, with its backend signature normalised."""
    server_id = getattr(message, "server_id", None)
    fields = {f.name: v for f, v in message.ListFields() if f.name != "server_id"}
    if "payload" in fields:
        fields["payload"] = len(fields["payload"].body)
    return (
        type(message).__name__,
        tuple(sorted(fields.items())),
        world.tag(server_id) if server_id else None,
    )


# --------------------------------------------------------------------------------------------- flavours


@dataclass
class Client:
    stub: test_pb2_grpc.TestServiceStub
    unimplemented: test_pb2_grpc.UnimplementedServiceStub
    close: Callable[[], Any]  # sync, or a coroutine function for aio flavours
    is_aio: bool


def _client(channel: Any, close: Callable[[], Any], is_aio: bool) -> Client:
    return Client(
        test_pb2_grpc.TestServiceStub(channel), test_pb2_grpc.UnimplementedServiceStub(channel), close, is_aio
    )


def _routes(service: str) -> dict[str, str]:
    target = f"{service}.{NAMESPACE}"
    return {SERVICE: target, UNIMPLEMENTED_SERVICE: target}


def make_control_sync(world: World, service: str) -> Client:
    ch = grpc.insecure_channel(world.backends[0].address)
    return _client(ch, ch.close, False)


async def make_control_aio(world: World, service: str) -> Client:
    ch = grpc.aio.insecure_channel(world.backends[0].address)
    return _client(ch, ch.close, True)


def make_sync_factory(mode_name: str) -> Callable[[World, str], Client]:
    def make(world: World, service: str) -> Client:
        ch = lookaside_grpc.channel(
            service, namespace=NAMESPACE, lookaside=world.lookaside, mode=mode(mode_name)
        )
        return _client(ch, ch.close, False)

    return make


def make_aio_factory(mode_name: str) -> Callable[[World, str], Awaitable[Client]]:
    async def make(world: World, service: str) -> Client:
        ch = lookaside_grpc.aio.channel(
            service, namespace=NAMESPACE, lookaside=world.lookaside, mode=mode(mode_name)
        )
        return _client(ch, ch.close, True)

    return make


def make_sync_interceptor(world: World, service: str) -> Client:
    interceptor = lookaside_grpc.LookasideInterceptor(lookaside=world.lookaside, routes=_routes(service))
    original = grpc.insecure_channel(world.fallback.address)
    ch = grpc.intercept_channel(original, interceptor)

    def close() -> None:
        ch.close()
        interceptor.close()

    return _client(ch, close, False)


async def make_aio_interceptors(world: World, service: str) -> Client:
    interceptors = lookaside_grpc.aio.interceptors(lookaside=world.lookaside, routes=_routes(service))
    ch = grpc.aio.insecure_channel(world.fallback.address, interceptors=interceptors)

    async def close() -> None:
        await ch.close()
        await interceptors[0].close()

    return _client(ch, close, True)


class PassThrough(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """A sync interceptor that changes nothing (the interceptor flavour's control)."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(details, requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(details, requests)


class AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


class AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


class AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(details, requests)


class AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(details, requests)


def make_control_sync_intercepted(world: World, service: str) -> Client:
    ch = grpc.intercept_channel(grpc.insecure_channel(world.backends[0].address), PassThrough())
    return _client(ch, ch.close, False)


async def make_control_aio_intercepted(world: World, service: str) -> Client:
    interceptors = [AioUnaryUnary(), AioUnaryStream(), AioStreamUnary(), AioStreamStream()]
    ch = grpc.aio.insecure_channel(world.backends[0].address, interceptors=interceptors)
    return _client(ch, ch.close, True)


#: flavour -> (builder, is_aio, its control). The controls are plain grpc channels (no library) to one
#: backend of the set; the interceptor flavours' control is that plain channel with pass-through
#: interceptors, i.e. what the application had before adding ours (grpc.aio's intercepted calls differ from
#: plain ones in one respect, see test_intercepted_controls).
FLAVOURS: dict[str, tuple[Callable[[World, str], Any], bool, str]] = {
    "control_sync": (make_control_sync, False, "control_sync"),
    "control_sync_intercepted": (make_control_sync_intercepted, False, "control_sync_intercepted"),
    "sync_watch": (make_sync_factory("watch"), False, "control_sync"),
    "sync_per_call": (make_sync_factory("per_call"), False, "control_sync"),
    "sync_interceptor": (make_sync_interceptor, False, "control_sync_intercepted"),
    "control_aio": (make_control_aio, True, "control_aio"),
    "control_aio_intercepted": (make_control_aio_intercepted, True, "control_aio_intercepted"),
    "aio_watch": (make_aio_factory("watch"), True, "control_aio"),
    "aio_per_call": (make_aio_factory("per_call"), True, "control_aio"),
    "aio_interceptors": (make_aio_interceptors, True, "control_aio_intercepted"),
}


# --------------------------------------------------------------------------------------------- sync cases


class Requests:
    """A request iterator the test feeds one message at a time (bounded waits; ``end()`` half-closes)."""

    _END = object()

    def __init__(self, *initial: Any, hold: bool = False) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        for message in initial:
            self._queue.put(message)
        if not hold:
            self._queue.put(self._END)

    def put(self, message: Any) -> None:
        self._queue.put(message)

    def end(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                message = self._queue.get(timeout=CASE_TIMEOUT)
            except queue.Empty:
                return
            if message is self._END:
                return
            yield message


def sync_unary(world: World, multi: Any, request: Any, **kwargs: Any) -> Outcome:
    try:
        response, call = multi.with_call(request, timeout=kwargs.pop("timeout", CALL_TIMEOUT), **kwargs)
    except grpc.RpcError as err:
        return Outcome(
            err.code(),
            err.details(),
            keep(world, err.initial_metadata()),
            keep(world, err.trailing_metadata()),
        )
    return Outcome(
        call.code(),
        call.details(),
        keep(world, call.initial_metadata()),
        keep(world, call.trailing_metadata()),
        (describe(world, response),),
    )


def sync_stream(world: World, call: Any, steps: Callable[[Any], list[Any]]) -> Outcome:
    """Run ``steps(call)`` (reads from a response-streaming call), then report the call's outcome."""
    messages: list[Any] = []
    try:
        messages = steps(call)
    except grpc.RpcError:
        pass
    return Outcome(
        call.code(),
        call.details(),
        keep(world, call.initial_metadata()),
        keep(world, call.trailing_metadata()),
        tuple(describe(world, m) for m in messages),
    )


def s_empty_unary(world: World, c: Client) -> list[Outcome]:
    return [sync_unary(world, c.stub.EmptyCall, empty_pb2.Empty())]


def s_large_unary(world: World, c: Client) -> list[Outcome]:
    request = messages_pb2.SimpleRequest(response_size=314159, payload=payload(271828))
    return [sync_unary(world, c.stub.UnaryCall, request)]


CLIENT_SIZES = (27182, 8, 1828, 45904)
SERVER_SIZES = (31415, 9, 2653, 58979)


def s_client_streaming(world: World, c: Client) -> list[Outcome]:
    requests = [messages_pb2.StreamingInputCallRequest(payload=payload(n)) for n in CLIENT_SIZES]
    return [sync_unary(world, c.stub.StreamingInputCall, iter(requests))]


def s_server_streaming(world: World, c: Client) -> list[Outcome]:
    call = c.stub.StreamingOutputCall(streaming_request(*SERVER_SIZES), timeout=CALL_TIMEOUT)
    return [sync_stream(world, call, list)]


def s_ping_pong(world: World, c: Client) -> list[Outcome]:
    requests = Requests(hold=True)
    call = c.stub.FullDuplexCall(iter(requests), timeout=CALL_TIMEOUT)

    def steps(responses: Any) -> list[Any]:
        got = []
        for size, body in zip(SERVER_SIZES, CLIENT_SIZES, strict=True):
            requests.put(streaming_request(size, body=body))
            got.append(next(responses))
        requests.end()
        got.extend(responses)  # nothing more: the server ends with the requests
        return got

    try:
        return [sync_stream(world, call, steps)]
    finally:
        requests.end()


def s_empty_stream(world: World, c: Client) -> list[Outcome]:
    call = c.stub.FullDuplexCall(iter(()), timeout=CALL_TIMEOUT)
    return [sync_stream(world, call, list)]


def s_cancel_after_begin(world: World, c: Client) -> list[Outcome]:
    requests = Requests(hold=True)  # nothing sent before the cancel
    try:
        future = c.stub.StreamingInputCall.future(iter(requests), timeout=CALL_TIMEOUT)
        cancelled = future.cancel()
        now = future.cancelled()
        return [Outcome(future.code(), future.details(), cancelled=(cancelled, now, future.done()))]
    finally:
        requests.end()


def s_cancel_after_first_response(world: World, c: Client) -> list[Outcome]:
    requests = Requests(streaming_request(31415, body=27182), hold=True)
    try:
        call = c.stub.FullDuplexCall(iter(requests), timeout=CALL_TIMEOUT)
        first = describe(world, next(call))
        cancelled = call.cancel()
        now = call.cancelled()
        try:
            after: Any = describe(world, next(call))
        except grpc.RpcError as err:
            after = err.code()
        except StopIteration:
            after = "StopIteration"
        return [Outcome(call.code(), call.details(), messages=(first, after), cancelled=(cancelled, now))]
    finally:
        requests.end()


#: timeout_on_sleeping_server: the server sleeps 2 s before its reply, the call's deadline is 100 ms. (The
#: interop spec's 1 ms deadline makes a fresh plain grpc.aio channel end INTERNAL "Internal error from
#: Core" about one time in eight, grpcio 1.85: no control to compare with. A deadline that runs out while
#: the client still waits for the lookaside is test_client_behaviour's item 1.)
SLEEPING_DEADLINE = 0.1
SLEEPING_REQUEST = streaming_request(1, body=27182, interval_us=2_000_000)


def s_timeout_on_sleeping_server(world: World, c: Client) -> list[Outcome]:
    requests = Requests(SLEEPING_REQUEST, hold=True)  # never half-closed before the deadline
    try:
        call = c.stub.FullDuplexCall(iter(requests), timeout=SLEEPING_DEADLINE)
        return [sync_stream(world, call, list)]
    finally:
        requests.end()


def s_custom_metadata(world: World, c: Client) -> list[Outcome]:
    metadata = ((ECHO_INITIAL, INITIAL_VALUE), (ECHO_TRAILING, TRAILING_VALUE))
    request = messages_pb2.SimpleRequest(response_size=314159, payload=payload(271828))
    unary = sync_unary(world, c.stub.UnaryCall, request, metadata=metadata)
    call = c.stub.FullDuplexCall(
        iter([streaming_request(314159, body=271828)]), timeout=CALL_TIMEOUT, metadata=metadata
    )
    return [unary, sync_stream(world, call, list)]


def _status_case(world: World, c: Client, message: str, duplex: bool) -> list[Outcome]:
    status = messages_pb2.EchoStatus(code=2, message=message)
    outcomes = [sync_unary(world, c.stub.UnaryCall, messages_pb2.SimpleRequest(response_status=status))]
    if duplex:
        call = c.stub.FullDuplexCall(iter([streaming_request(status=(2, message))]), timeout=CALL_TIMEOUT)
        outcomes.append(sync_stream(world, call, list))
    return outcomes


def s_status_code_and_message(world: World, c: Client) -> list[Outcome]:
    return _status_case(world, c, "test status message", duplex=True)


def s_special_status_message(world: World, c: Client) -> list[Outcome]:
    return _status_case(world, c, SPECIAL_MESSAGE, duplex=False)


def s_unimplemented_method(world: World, c: Client) -> list[Outcome]:
    return [sync_unary(world, c.stub.UnimplementedCall, empty_pb2.Empty())]


def s_unimplemented_service(world: World, c: Client) -> list[Outcome]:
    return [sync_unary(world, c.unimplemented.UnimplementedCall, empty_pb2.Empty())]


# --------------------------------------------------------------------------------------------- aio cases


#: What an aio call's methods may raise once the call has ended: AioRpcError, or (grpc.aio's intercepted
#: calls, racing the deadline) InvalidStateError("RPC already finished") from write(). The outcome is then
#: read from the call itself (code, details, metadata).
AIO_CALL_ERRORS = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


async def aio_outcome(
    world: World, call: Any, messages: Sequence[Any] = (), cancelled: tuple[Any, ...] = ()
) -> Outcome:
    return Outcome(
        await call.code(),
        await call.details(),
        keep(world, await call.initial_metadata()),
        keep(world, await call.trailing_metadata()),
        tuple(describe(world, m) for m in messages),
        cancelled,
    )


async def aio_unary(world: World, multi: Any, request: Any, **kwargs: Any) -> Outcome:
    call = multi(request, timeout=kwargs.pop("timeout", CALL_TIMEOUT), **kwargs)
    messages = []
    try:
        messages.append(await call)
    except AIO_CALL_ERRORS:
        pass
    return await aio_outcome(world, call, messages)


async def a_empty_unary(world: World, c: Client) -> list[Outcome]:
    return [await aio_unary(world, c.stub.EmptyCall, empty_pb2.Empty())]


async def a_large_unary(world: World, c: Client) -> list[Outcome]:
    request = messages_pb2.SimpleRequest(response_size=314159, payload=payload(271828))
    return [await aio_unary(world, c.stub.UnaryCall, request)]


async def a_client_streaming(world: World, c: Client) -> list[Outcome]:
    call = c.stub.StreamingInputCall(timeout=CALL_TIMEOUT)
    messages = []
    try:
        for n in CLIENT_SIZES:
            await call.write(messages_pb2.StreamingInputCallRequest(payload=payload(n)))
        await call.done_writing()
        messages.append(await call)
    except AIO_CALL_ERRORS:
        pass
    return [await aio_outcome(world, call, messages)]


async def a_server_streaming(world: World, c: Client) -> list[Outcome]:
    call = c.stub.StreamingOutputCall(streaming_request(*SERVER_SIZES), timeout=CALL_TIMEOUT)
    messages = []
    try:
        async for message in call:
            messages.append(message)
    except AIO_CALL_ERRORS:
        pass
    return [await aio_outcome(world, call, messages)]


async def a_ping_pong(world: World, c: Client) -> list[Outcome]:
    call = c.stub.FullDuplexCall(timeout=CALL_TIMEOUT)
    messages = []
    try:
        for size, body in zip(SERVER_SIZES, CLIENT_SIZES, strict=True):
            await call.write(streaming_request(size, body=body))
            messages.append(await call.read())
        await call.done_writing()
        last = await call.read()
        if last is not grpc.aio.EOF:
            messages.append(last)
    except AIO_CALL_ERRORS:
        pass
    return [await aio_outcome(world, call, messages)]


async def a_empty_stream(world: World, c: Client) -> list[Outcome]:
    call = c.stub.FullDuplexCall(timeout=CALL_TIMEOUT)
    messages = []
    try:
        await call.done_writing()
        last = await call.read()
        if last is not grpc.aio.EOF:
            messages.append(last)
    except AIO_CALL_ERRORS:
        pass
    return [await aio_outcome(world, call, messages)]


async def a_cancel_after_begin(world: World, c: Client) -> list[Outcome]:
    call = c.stub.StreamingInputCall(timeout=CALL_TIMEOUT)
    cancelled = call.cancel()
    now = call.cancelled()
    code = await call.code()
    return [Outcome(code, await call.details(), cancelled=(cancelled, now, call.done(), call.cancelled()))]


async def a_cancel_after_first_response(world: World, c: Client) -> list[Outcome]:
    call = c.stub.FullDuplexCall(timeout=CALL_TIMEOUT)
    await call.write(streaming_request(31415, body=27182))
    first = describe(world, await call.read())
    cancelled = call.cancel()
    now = call.cancelled()
    code = await call.code()
    return [
        Outcome(code, await call.details(), messages=(first,), cancelled=(cancelled, now, call.cancelled()))
    ]


async def a_timeout_on_sleeping_server(world: World, c: Client) -> list[Outcome]:
    call = c.stub.FullDuplexCall(timeout=SLEEPING_DEADLINE)
    messages = []
    try:
        await call.write(SLEEPING_REQUEST)
        last = await call.read()
        if last is not grpc.aio.EOF:
            messages.append(last)
    except AIO_CALL_ERRORS:
        pass
    return [await aio_outcome(world, call, messages)]


async def a_custom_metadata(world: World, c: Client) -> list[Outcome]:
    metadata = grpc.aio.Metadata((ECHO_INITIAL, INITIAL_VALUE), (ECHO_TRAILING, TRAILING_VALUE))
    request = messages_pb2.SimpleRequest(response_size=314159, payload=payload(271828))
    unary = await aio_unary(world, c.stub.UnaryCall, request, metadata=metadata)
    call = c.stub.FullDuplexCall(timeout=CALL_TIMEOUT, metadata=metadata)
    messages = []
    try:
        await call.write(streaming_request(314159, body=271828))
        await call.done_writing()
        async for message in call:
            messages.append(message)
    except AIO_CALL_ERRORS:
        pass
    return [unary, await aio_outcome(world, call, messages)]


async def _a_status_case(world: World, c: Client, message: str, duplex: bool) -> list[Outcome]:
    status = messages_pb2.EchoStatus(code=2, message=message)
    outcomes = [await aio_unary(world, c.stub.UnaryCall, messages_pb2.SimpleRequest(response_status=status))]
    if duplex:
        call = c.stub.FullDuplexCall(timeout=CALL_TIMEOUT)
        messages = []
        try:
            await call.write(streaming_request(status=(2, message)))
            await call.done_writing()
            async for reply in call:
                messages.append(reply)
        except AIO_CALL_ERRORS:
            pass
        outcomes.append(await aio_outcome(world, call, messages))
    return outcomes


async def a_status_code_and_message(world: World, c: Client) -> list[Outcome]:
    return await _a_status_case(world, c, "test status message", duplex=True)


async def a_special_status_message(world: World, c: Client) -> list[Outcome]:
    return await _a_status_case(world, c, SPECIAL_MESSAGE, duplex=False)


async def a_unimplemented_method(world: World, c: Client) -> list[Outcome]:
    return [await aio_unary(world, c.stub.UnimplementedCall, empty_pb2.Empty())]


async def a_unimplemented_service(world: World, c: Client) -> list[Outcome]:
    return [await aio_unary(world, c.unimplemented.UnimplementedCall, empty_pb2.Empty())]


#: interop case -> (sync implementation, aio implementation)
CASES: dict[
    str, tuple[Callable[[World, Client], list[Outcome]], Callable[[World, Client], Awaitable[list[Outcome]]]]
] = {
    "empty_unary": (s_empty_unary, a_empty_unary),
    "large_unary": (s_large_unary, a_large_unary),
    "client_streaming": (s_client_streaming, a_client_streaming),
    "server_streaming": (s_server_streaming, a_server_streaming),
    "ping_pong": (s_ping_pong, a_ping_pong),
    "empty_stream": (s_empty_stream, a_empty_stream),
    "cancel_after_begin": (s_cancel_after_begin, a_cancel_after_begin),
    "cancel_after_first_response": (s_cancel_after_first_response, a_cancel_after_first_response),
    "timeout_on_sleeping_server": (s_timeout_on_sleeping_server, a_timeout_on_sleeping_server),
    "custom_metadata": (s_custom_metadata, a_custom_metadata),
    "status_code_and_message": (s_status_code_and_message, a_status_code_and_message),
    "special_status_message": (s_special_status_message, a_special_status_message),
    "unimplemented_method": (s_unimplemented_method, a_unimplemented_method),
    "unimplemented_service": (s_unimplemented_service, a_unimplemented_service),
}


# --------------------------------------------------------------------------------------------- running


class Runner:
    """Builds, runs and closes clients of every flavour; keeps the shared ones and the controls' outcomes."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.shared: dict[str, Client] = {}
        self.controls: dict[tuple[str, str], list[Outcome]] = {}
        self._lock = threading.Lock()

    def build(self, flavour: str, service: str) -> Client:
        make, is_aio, _ = FLAVOURS[flavour]
        if is_aio:
            return self.world.loop.run(make(self.world, service))
        return make(self.world, service)  # type: ignore[no-any-return]

    def close(self, client: Client) -> None:
        if client.is_aio:
            self.world.loop.run(client.close())
        else:
            client.close()

    def run(self, case: str, client: Client) -> list[Outcome]:
        sync_case, aio_case = CASES[case]
        if client.is_aio:
            return self.world.loop.run(aio_case(self.world, client))
        result: Future[list[Outcome]] = Future()

        def work() -> None:  # in a thread, so a hung call fails the test instead of hanging it
            try:
                result.set_result(sync_case(self.world, client))
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                result.set_exception(e)

        threading.Thread(target=work, daemon=True).start()
        return result.result(CASE_TIMEOUT)

    def shared_client(self, flavour: str) -> Client:
        with self._lock:
            if flavour not in self.shared:
                client = self.shared[flavour] = self.build(flavour, SHARED_SERVICE)
                self.run("empty_unary", client)  # warm: "shared" is the steady state, "fresh" the cold start
            return self.shared[flavour]

    def control(self, case: str, flavour: str) -> list[Outcome]:
        """The outcome of ``flavour``'s control: the same case on the control's shared plain channel."""
        key = (case, FLAVOURS[flavour][2])
        if key not in self.controls:
            self.controls[key] = self.run(case, self.shared_client(key[1]))
        return self.controls[key]

    def close_all(self) -> None:
        for client in self.shared.values():
            try:
                self.close(client)
            except Exception:  # noqa: BLE001 - teardown of every flavour, failures reported by the tests
                pass


@pytest.fixture(scope="module")
def runner(world: World) -> Iterator[Runner]:
    r = Runner(world)
    yield r
    r.close_all()


_STRUCTURE = """
import json
from lookaside_dev.interop.v1 import test_pb2
file = test_pb2.DESCRIPTOR
method = file.services_by_name["TestService"].methods_by_name["UnaryCall"]
print(json.dumps({
    "name": file.name,
    "messages": sorted(file.message_types_by_name),
    "services": sorted(file.services_by_name),
    "imports": sorted(d.name for d in file.dependencies),
    "request_file": method.input_type.file.name,
}))
"""


def test_the_test_service_proto_holds_only_the_service() -> None:
    """The structure item 9 is about: test.proto defines no message, only the services, and imports its
    messages from the two other files. (Checked in a child process: importing ``test_pb2`` here would put
    the service in this process's descriptor pool and hide the very bug item 9 is about, which is that
    applications import only ``test_pb2_grpc``.)"""
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", _STRUCTURE], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "name": "lookaside_dev/interop/v1/test.proto",
        "messages": [],
        "services": ["TestService", "UnimplementedService"],
        "imports": ["lookaside_dev/interop/v1/empty.proto", "lookaside_dev/interop/v1/messages.proto"],
        "request_file": "lookaside_dev/interop/v1/messages.proto",
    }


def test_controls_are_what_the_interop_spec_says(runner: Runner) -> None:
    """The harness itself: the plain channels give the outcomes gRPC's interop test cases require."""
    for control in ("control_sync", "control_aio"):
        got = {case: runner.control(case, control) for case in CASES}
        ok = grpc.StatusCode.OK
        assert got["empty_unary"][0].code is ok and got["empty_unary"][0].messages == (("Empty", (), None),)
        assert got["large_unary"][0].messages == (("SimpleResponse", (("payload", 314159),), "backend"),)
        assert got["client_streaming"][0].messages == (
            ("StreamingInputCallResponse", (("aggregated_payload_size", 74922),), "backend"),
        )
        assert [m[1] for m in got["server_streaming"][0].messages] == [
            (("payload", n),) for n in SERVER_SIZES
        ]
        assert [m[1] for m in got["ping_pong"][0].messages] == [(("payload", n),) for n in SERVER_SIZES]
        assert got["empty_stream"][0] == Outcome(
            ok, got["empty_stream"][0].details, (), (("x-served-by", "backend"),)
        )
        assert got["cancel_after_begin"][0].code is grpc.StatusCode.CANCELLED
        assert got["cancel_after_begin"][0].cancelled[:2] == (True, True)
        assert got["cancel_after_first_response"][0].code is grpc.StatusCode.CANCELLED
        assert got["timeout_on_sleeping_server"][0].code is grpc.StatusCode.DEADLINE_EXCEEDED
        for outcome in got["custom_metadata"]:
            assert (ECHO_INITIAL, INITIAL_VALUE) in outcome.initial
            assert (ECHO_TRAILING, TRAILING_VALUE) in outcome.trailing
        for outcome in got["status_code_and_message"]:
            assert (outcome.code, outcome.details) == (grpc.StatusCode.UNKNOWN, "test status message")
        assert got["special_status_message"][0].details == SPECIAL_MESSAGE
        assert got["unimplemented_method"][0].code is grpc.StatusCode.UNIMPLEMENTED
        assert got["unimplemented_service"][0].code is grpc.StatusCode.UNIMPLEMENTED


def test_intercepted_controls(runner: Runner) -> None:
    """A pass-through interceptor changes no outcome, except grpc.aio's own: right after ``cancel()`` an
    intercepted aio call that has not started yet is not yet ``cancelled()`` (grpcio's InterceptedCall), a
    plain one is."""
    for case in CASES:
        sync_plain = runner.control(case, "control_sync")
        assert runner.control(case, "control_sync_intercepted") == sync_plain, case
        plain = runner.control(case, "control_aio")
        intercepted = runner.control(case, "control_aio_intercepted")
        if case == "cancel_after_begin":
            assert plain[0].cancelled[:2] == (True, True)
            assert intercepted[0].cancelled[:2] == (True, False)
            assert [o.code for o in intercepted] == [o.code for o in plain] == [grpc.StatusCode.CANCELLED]
        else:
            assert intercepted == plain, case


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_shared_channel(runner: Runner, flavour: str, case: str) -> None:
    """The case on the flavour's one channel shared by every case gives the plain channel's outcome."""
    control = runner.control(case, flavour)
    assert runner.run(case, runner.shared_client(flavour)) == control


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_fresh_channel(runner: Runner, world: World, flavour: str, case: str) -> None:
    """The case as the first call of a brand-new channel (own target: nothing shared, a cold start) gives
    the plain channel's outcome; the channel then closes cleanly."""
    control = runner.control(case, flavour)
    client = runner.build(flavour, next(world.fresh_names))
    try:
        got = runner.run(case, client)
    finally:
        runner.close(client)
    assert got == control
