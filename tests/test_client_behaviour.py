"""Issue 11, items 1-14: the client behaves as a plain grpc channel, in every flavour it applies to.

Each test runs the behaviour through the library's flavours (sync/aio factory in watch and per_call mode,
sync/aio interceptors) and, where a plain grpc channel has the behaviour, through a plain channel too (the
control), asserting the same outcome. Real gRPC servers on 127.0.0.1 only (the interop TestService of
``lookaside_dev/interop`` as backends, a ``FakeLookaside`` as the lookaside); every wait is on a condition
with a deadline.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import itertools
import json
import logging
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest

import lookaside_grpc
import lookaside_grpc.aio
from examples.greet import greet_pb2, greet_pb2_grpc
from examples.greet.server import GreetServicer
from lookaside_dev.backends import greet_backend_of
from lookaside_dev.fakes import unused_address, wait_until
from lookaside_dev.interop.server import SERVICE, UNIMPLEMENTED_SERVICE, InteropBackend
from lookaside_dev.interop.v1 import messages_pb2, test_pb2_grpc
from lookaside_dev.silent import FreezableProxy, ServedLookaside, SilentListener, serve_lookaside

#: A library thread that dies of an exception (a watch thread, a timer) fails the test it happens in.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
NS = "default"
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
CANCELLED = grpc.StatusCode.CANCELLED
SHAPES = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_names = itertools.count()


def fresh_service() -> str:
    """A Service name no other test uses, so no balancer is shared across tests."""
    return f"svc{next(_names)}"


def mode(name: str) -> Any:
    """The public mode value: the mode objects once the library has them, else the mode string."""
    if name == "watch":
        return lookaside_grpc.Watch() if hasattr(lookaside_grpc, "Watch") else "watch"
    return lookaside_grpc.PerCall() if hasattr(lookaside_grpc, "PerCall") else "per_call"


def routes(service: str) -> dict[str, str]:
    """Interceptor routes for the interop test service (whose .proto holds only the service)."""
    return {SERVICE: f"{service}.{NS}", UNIMPLEMENTED_SERVICE: f"{service}.{NS}"}


GREET_SERVICE = "greet.GreetService"


def greet_routes(service: str) -> dict[str, str]:
    """Interceptor routes for Greet (messages and service in one .proto): the interceptor tests of the
    other items use it, so that they do not depend on item 9."""
    return {GREET_SERVICE: f"{service}.{NS}"}


def threads() -> int:
    """Live Python threads of the client side: the in-process servers' pool threads (named
    ``ThreadPoolExecutor-*``) grow on demand and are not counted."""
    gc.collect()
    return sum(1 for t in threading.enumerate() if not t.name.startswith("ThreadPoolExecutor"))


# --------------------------------------------------------------------------------------------- calls


@dataclass
class Result:
    code: grpc.StatusCode
    details: str | None
    elapsed: float
    served_by: str = ""


def _request(shape: str) -> Any:
    if shape in ("unary_unary",):
        return messages_pb2.SimpleRequest(response_size=3)
    if shape == "stream_unary":
        return messages_pb2.StreamingInputCallRequest(payload=messages_pb2.Payload(body=b"abc"))
    return messages_pb2.StreamingOutputCallRequest(
        response_parameters=[messages_pb2.ResponseParameters(size=3)]
    )


def sync_call(channel: Any, shape: str = "unary_unary", **kwargs: Any) -> Result:
    """One call of ``shape`` on ``channel``; its status, details, duration and the answering backend."""
    stub = test_pb2_grpc.TestServiceStub(channel)
    kwargs.setdefault("timeout", 5.0)
    request = _request(shape)
    t0 = time.monotonic()
    try:
        if shape == "unary_unary":
            replies = [stub.UnaryCall(request, **kwargs)]
        elif shape == "unary_stream":
            replies = list(stub.StreamingOutputCall(request, **kwargs))
        elif shape == "stream_unary":
            replies = [stub.StreamingInputCall(iter([request]), **kwargs)]
        else:
            replies = list(stub.FullDuplexCall(iter([request]), **kwargs))
    except grpc.RpcError as err:
        return Result(err.code(), err.details(), time.monotonic() - t0)
    return Result(OK, None, time.monotonic() - t0, replies[0].server_id if replies else "")


async def aio_call(channel: Any, shape: str = "unary_unary", **kwargs: Any) -> Result:
    stub = test_pb2_grpc.TestServiceStub(channel)
    kwargs.setdefault("timeout", 5.0)
    request = _request(shape)
    t0 = time.monotonic()
    try:
        if shape == "unary_unary":
            replies = [await stub.UnaryCall(request, **kwargs)]
        elif shape == "unary_stream":
            replies = [r async for r in stub.StreamingOutputCall(request, **kwargs)]
        elif shape == "stream_unary":
            replies = [await stub.StreamingInputCall(iter([request]), **kwargs)]
        else:
            replies = [r async for r in stub.FullDuplexCall(iter([request]), **kwargs)]
    except grpc.aio.AioRpcError as err:
        return Result(err.code(), err.details(), time.monotonic() - t0)
    return Result(OK, None, time.monotonic() - t0, replies[0].server_id if replies else "")


def _greeting(name: str = "Ada") -> greet_pb2.GreetingRequest:
    return greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name=name, last_name="L"))


def greet_call(channel: Any, shape: str = "unary_unary", **kwargs: Any) -> Result:
    """One Greet call of ``shape``; the answering backend from the reply's signature."""
    stub = greet_pb2_grpc.GreetServiceStub(channel)
    kwargs.setdefault("timeout", 5.0)
    name = kwargs.pop("name", "Ada")
    t0 = time.monotonic()
    try:
        if shape == "unary_unary":
            replies = [stub.Greet(_greeting(name), **kwargs)]
        elif shape == "unary_stream":
            replies = list(stub.GreetManyTimes(_greeting(name), **kwargs))
        elif shape == "stream_unary":
            replies = [stub.LongGreet(iter([_greeting(name)]), **kwargs)]
        else:
            replies = list(stub.GreetEveryone(iter([_greeting(name)]), **kwargs))
    except grpc.RpcError as err:
        return Result(err.code(), err.details(), time.monotonic() - t0)
    return Result(OK, None, time.monotonic() - t0, greet_backend_of(replies[0].result) if replies else "")


async def greet_aio_call(channel: Any, shape: str = "unary_unary", **kwargs: Any) -> Result:
    stub = greet_pb2_grpc.GreetServiceStub(channel)
    kwargs.setdefault("timeout", 5.0)
    name = kwargs.pop("name", "Ada")
    t0 = time.monotonic()
    try:
        if shape == "unary_unary":
            replies = [await stub.Greet(_greeting(name), **kwargs)]
        elif shape == "unary_stream":
            replies = [r async for r in stub.GreetManyTimes(_greeting(name), **kwargs)]
        elif shape == "stream_unary":
            replies = [await stub.LongGreet(iter([_greeting(name)]), **kwargs)]
        else:
            replies = [r async for r in stub.GreetEveryone(iter([_greeting(name)]), **kwargs)]
    except grpc.aio.AioRpcError as err:
        return Result(err.code(), err.details(), time.monotonic() - t0)
    return Result(OK, None, time.monotonic() - t0, greet_backend_of(replies[0].result) if replies else "")


class GreetBackend:
    """One Greet server on 127.0.0.1 with the given server options."""

    def __init__(self, options: Any = ()) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.servicer = GreetServicer(self.address)
        greet_pb2_grpc.add_GreetServiceServicer_to_server(self.servicer, self.server)
        self.server.start()

    def total(self) -> int:
        return self.servicer.calls

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)


# --------------------------------------------------------------------------------------------- flavours

SYNC_FLAVOURS = ("sync_watch", "sync_per_call", "sync_interceptor")
AIO_FLAVOURS = ("aio_watch", "aio_per_call", "aio_interceptors")
SYNC_FACTORIES = ("sync_watch", "sync_per_call")
AIO_FACTORIES = ("aio_watch", "aio_per_call")


@contextmanager
def sync_flavour(
    flavour: str,
    lookaside: str,
    original: str = "",
    service: str = "",
    original_options: Any = (),
    routes_for: Callable[[str], dict[str, str]] = routes,
    **kw: Any,
) -> Iterator[Any]:
    """A channel of a sync flavour (closed after use, with its interceptor); ``original``: the address of the
    interceptor's original channel."""
    service = service or fresh_service()
    if flavour == "sync_interceptor":
        interceptor = lookaside_grpc.LookasideInterceptor(
            lookaside=lookaside, routes=routes_for(service), **kw
        )
        ch = grpc.intercept_channel(grpc.insecure_channel(original, options=original_options), interceptor)
        try:
            yield ch
        finally:
            ch.close()
            interceptor.close()
        return
    ch = lookaside_grpc.channel(
        service, namespace=NS, lookaside=lookaside, mode=mode(flavour.removeprefix("sync_")), **kw
    )
    try:
        yield ch
    finally:
        ch.close()


@asynccontextmanager
async def aio_flavour(
    flavour: str,
    lookaside: str,
    original: str = "",
    service: str = "",
    original_options: Any = (),
    routes_for: Callable[[str], dict[str, str]] = routes,
    **kw: Any,
) -> AsyncIterator[Any]:
    service = service or fresh_service()
    if flavour == "aio_interceptors":
        interceptors = lookaside_grpc.aio.interceptors(lookaside=lookaside, routes=routes_for(service), **kw)
        ch = grpc.aio.insecure_channel(original, options=original_options, interceptors=interceptors)
        try:
            yield ch
        finally:
            await ch.close()
            await interceptors[0].close()
        return
    ch = lookaside_grpc.aio.channel(
        service, namespace=NS, lookaside=lookaside, mode=mode(flavour.removeprefix("aio_")), **kw
    )
    try:
        yield ch
    finally:
        await ch.close()


class AioUnaryUnaryPassThrough(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


async def await_until(cond: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0) -> None:
    """Poll ``cond`` on the loop until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------------------------- fixtures


@dataclass
class World:
    """Three balanced backends, one more for the interceptors' original channel, a lookaside naming the
    three, and how to call the service they serve."""

    backends: list[Any]
    fallback: Any
    lookaside: ServedLookaside
    call: Callable[..., Result]
    acall: Callable[..., Awaitable[Result]]
    routes: Callable[[str], dict[str, str]]

    @property
    def addresses(self) -> list[str]:
        return [b.address for b in self.backends]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """The interop test service."""
    backends = [InteropBackend() for _ in range(3)]
    fallback = InteropBackend()
    lookaside = serve_lookaside([b.address for b in backends])
    yield World(backends, fallback, lookaside, sync_call, aio_call, routes)
    lookaside.stop()
    for b in [*backends, fallback]:
        b.stop()


@pytest.fixture(scope="module")
def greet() -> Iterator[World]:
    """The Greet example service (for interceptor tests that must not depend on item 9)."""
    backends = [GreetBackend() for _ in range(3)]
    fallback = GreetBackend()
    lookaside = serve_lookaside([b.address for b in backends])
    yield World(backends, fallback, lookaside, greet_call, greet_aio_call, greet_routes)
    lookaside.stop()
    for b in [*backends, fallback]:
        b.stop()


# ======================================== 1. deadline while waiting

WAIT_DEADLINE = 0.3


@pytest.mark.parametrize("shape", ["unary_unary", "unary_stream"])
@pytest.mark.parametrize("flavour", SYNC_FLAVOURS)
def test_01_deadline_while_waiting_for_the_lookaside_is_deadline_exceeded(flavour: str, shape: str) -> None:
    """A lookaside that accepts connections and never answers: the call's own deadline ends it with
    DEADLINE_EXCEEDED, as a plain channel to a never-answering address does (UNAVAILABLE would say a retry
    is safe). The interceptor's original channel also never answers, as the control's."""
    with SilentListener() as silent:
        with grpc.insecure_channel(silent.address) as plain:
            control = sync_call(plain, shape, timeout=WAIT_DEADLINE)
        with sync_flavour(flavour, silent.address, original=silent.address) as ch:
            got = sync_call(ch, shape, timeout=WAIT_DEADLINE)
    assert control.code is DEADLINE_EXCEEDED
    assert (got.code, got.details) == (control.code, control.details)
    assert got.elapsed < WAIT_DEADLINE + 1.0, f"took {got.elapsed:.3f}s for a {WAIT_DEADLINE}s deadline"


@pytest.mark.parametrize("shape", ["unary_unary", "unary_stream"])
@pytest.mark.parametrize("flavour", AIO_FLAVOURS)
async def test_01_aio_deadline_while_waiting_for_the_lookaside_is_deadline_exceeded(
    flavour: str, shape: str
) -> None:
    with SilentListener() as silent:
        async with grpc.aio.insecure_channel(silent.address) as plain:
            control = await aio_call(plain, shape, timeout=WAIT_DEADLINE)
        async with aio_flavour(flavour, silent.address, original=silent.address) as ch:
            got = await aio_call(ch, shape, timeout=WAIT_DEADLINE)
    assert control.code is DEADLINE_EXCEEDED
    assert (got.code, got.details) == (control.code, control.details)
    assert got.elapsed < WAIT_DEADLINE + 1.0, f"took {got.elapsed:.3f}s for a {WAIT_DEADLINE}s deadline"


@pytest.mark.parametrize("flavour", ["sync_interceptor", "aio_interceptors"])
async def test_01_interceptors_with_a_silent_lookaside_answer_as_their_original_channel(
    greet: World, flavour: str
) -> None:
    """Cold start against a lookaside that never answers: an interceptor call with a deadline gives what the
    original channel gives on its own (it falls back within the deadline), not an error of its own."""
    with SilentListener() as silent:
        if flavour == "sync_interceptor":
            with grpc.insecure_channel(greet.fallback.address) as plain:
                control = greet.call(plain, timeout=WAIT_DEADLINE * 3)
            with sync_flavour(flavour, silent.address, greet.fallback.address, routes_for=greet.routes) as ch:
                got = greet.call(ch, timeout=WAIT_DEADLINE * 3)
        else:
            async with grpc.aio.insecure_channel(greet.fallback.address) as plain:
                control = await greet.acall(plain, timeout=WAIT_DEADLINE * 3)
            async with aio_flavour(
                flavour, silent.address, greet.fallback.address, routes_for=greet.routes
            ) as ch:
                got = await greet.acall(ch, timeout=WAIT_DEADLINE * 3)
    assert (control.code, control.served_by) == (OK, greet.fallback.address)
    assert (got.code, got.details, got.served_by) == (control.code, control.details, control.served_by)


# ======================================== 2. aio cancel while picking


async def _cancel_pending(channel: Any) -> tuple[Any, ...]:
    """Start a unary call that cannot complete, cancel it; (cancel(), cancelled() at once, code, what
    awaiting the call raises, cancelled() after)."""
    call = test_pb2_grpc.TestServiceStub(channel).UnaryCall(messages_pb2.SimpleRequest(), timeout=5)
    await asyncio.sleep(0)  # let it start (and begin waiting for its pick)
    cancelled = call.cancel()
    now = call.cancelled()
    code = await asyncio.wait_for(call.code(), 5)
    try:
        await asyncio.wait_for(call, 5)
        raised: Any = None
    except asyncio.CancelledError:
        raised = asyncio.CancelledError
    except grpc.aio.AioRpcError as err:
        raised = err.code()
    return cancelled, now, code, raised, call.cancelled()


@pytest.mark.parametrize("flavour", AIO_FACTORIES)
async def test_02_aio_cancel_while_waiting_for_the_pick(flavour: str) -> None:
    """cancel() on a call still waiting for its pick returns True, cancelled() is True at once and
    ``await call.code()`` is CANCELLED, as for a plain aio call still waiting for its connection."""
    with SilentListener() as silent:
        async with grpc.aio.insecure_channel(silent.address) as plain:
            control = await _cancel_pending(plain)
        async with aio_flavour(flavour, silent.address) as ch:
            got = await _cancel_pending(ch)
    assert control == (True, True, CANCELLED, asyncio.CancelledError, True)
    assert got == control


async def test_02_aio_interceptors_cancel_while_waiting_for_the_pick() -> None:
    """The aio interceptors: the same outcome as the application's own intercepted channel (grpc.aio's
    intercepted calls may report cancelled() a moment late, so that is compared only once the code is in)."""
    with SilentListener() as silent:
        async with grpc.aio.insecure_channel(
            silent.address, interceptors=[AioUnaryUnaryPassThrough()]
        ) as plain:
            control = await _cancel_pending(plain)
        async with aio_flavour("aio_interceptors", silent.address, original=silent.address) as ch:
            got = await _cancel_pending(ch)
    assert (control[0], *control[2:]) == (True, CANCELLED, asyncio.CancelledError, True)
    assert (got[0], *got[2:]) == (control[0], *control[2:])


# ======================================== 3. wait_for_ready / fail fast

FAIL_FAST = 1.0  # a fail-fast call must end well within this (grpc: milliseconds); init_timeout is 10 s


def _three(call: Callable[[], Result]) -> list[Result]:
    return [call() for _ in range(3)]


@pytest.mark.parametrize("flavour", SYNC_FACTORIES)
def test_03_fail_fast_while_the_lookaside_was_never_reached(flavour: str) -> None:
    """Without wait_for_ready, a call while the lookaside has never been reached fails at once with
    UNAVAILABLE, as a plain channel in TRANSIENT_FAILURE does (not after init_timeout)."""
    nowhere = unused_address()
    with grpc.insecure_channel(unused_address()) as plain:
        control = _three(lambda: sync_call(plain, timeout=3))
    with sync_flavour(flavour, nowhere) as ch:
        got = _three(lambda: sync_call(ch, timeout=3))
    assert [r.code for r in control] == [UNAVAILABLE] * 3
    assert [r.code for r in got] == [UNAVAILABLE] * 3
    slowest = max(r.elapsed for r in got)
    assert slowest < FAIL_FAST, (
        f"slowest call {slowest * 1000:.0f} ms; plain channel {max(r.elapsed for r in control) * 1000:.0f} ms"
    )


@pytest.mark.parametrize("flavour", AIO_FACTORIES)
async def test_03_aio_fail_fast_while_the_lookaside_was_never_reached(flavour: str) -> None:
    nowhere = unused_address()
    async with grpc.aio.insecure_channel(unused_address()) as plain:
        control = [await aio_call(plain, timeout=3) for _ in range(3)]
    async with aio_flavour(flavour, nowhere) as ch:
        got = [await aio_call(ch, timeout=3) for _ in range(3)]
    assert [r.code for r in control] == [UNAVAILABLE] * 3
    assert [r.code for r in got] == [UNAVAILABLE] * 3
    slowest = max(r.elapsed for r in got)
    assert slowest < FAIL_FAST, (
        f"slowest call {slowest * 1000:.0f} ms; plain channel {max(r.elapsed for r in control) * 1000:.0f} ms"
    )


@pytest.mark.parametrize("flavour", SYNC_FACTORIES)
def test_03_fail_fast_with_no_ready_endpoint(flavour: str) -> None:
    """The lookaside answers, but its only endpoint refuses: UNAVAILABLE in milliseconds, as a plain channel
    to that endpoint."""
    refusing = unused_address()
    with serve_lookaside([refusing]) as la:
        with grpc.insecure_channel(refusing) as plain:
            control = _three(lambda: sync_call(plain, timeout=3))
        with sync_flavour(flavour, la.address) as ch:
            got = _three(lambda: sync_call(ch, timeout=3))
    assert [r.code for r in got] == [r.code for r in control] == [UNAVAILABLE] * 3
    assert max(r.elapsed for r in got) < FAIL_FAST, [round(r.elapsed * 1000) for r in got]


@pytest.mark.parametrize("flavour", SYNC_FACTORIES)
def test_03_wait_for_ready_waits_for_the_lookaside_and_an_endpoint(flavour: str) -> None:
    """wait_for_ready=True: the call waits (up to its deadline) for the lookaside to come up and name a
    ready endpoint, then succeeds, as a plain channel's call waits for its server to come up."""
    control_addr = unused_address()
    with grpc.insecure_channel(control_addr) as plain:
        pending = test_pb2_grpc.TestServiceStub(plain).UnaryCall.future(
            messages_pb2.SimpleRequest(), timeout=10, wait_for_ready=True
        )
        with pytest.raises(grpc.FutureTimeoutError):
            pending.result(timeout=0.3)  # still waiting 300 ms later
        with InteropBackend(port=int(control_addr.rsplit(":", 1)[1])):
            assert pending.result(timeout=10).server_id == control_addr

    la_addr = unused_address()
    with InteropBackend() as backend, sync_flavour(flavour, la_addr) as ch:
        pending = test_pb2_grpc.TestServiceStub(ch).UnaryCall.future(
            messages_pb2.SimpleRequest(), timeout=10, wait_for_ready=True
        )
        with pytest.raises(grpc.FutureTimeoutError):
            pending.result(timeout=0.3)
        with serve_lookaside([], port=int(la_addr.rsplit(":", 1)[1])) as la:
            with pytest.raises(grpc.FutureTimeoutError):
                pending.result(timeout=0.3)  # the lookaside is up, but names no endpoint yet
            la.servicer.set_endpoints([backend.address])
            assert pending.result(timeout=10).server_id == backend.address


@pytest.mark.parametrize("flavour", AIO_FACTORIES)
async def test_03_aio_wait_for_ready_waits_for_the_lookaside_and_an_endpoint(flavour: str) -> None:
    control_addr = unused_address()
    async with grpc.aio.insecure_channel(control_addr) as plain:
        call = test_pb2_grpc.TestServiceStub(plain).UnaryCall(
            messages_pb2.SimpleRequest(), timeout=10, wait_for_ready=True
        )
        done, _ = await asyncio.wait({asyncio.ensure_future(call.code())}, timeout=0.3)
        assert not done
        with InteropBackend(port=int(control_addr.rsplit(":", 1)[1])):
            assert (await asyncio.wait_for(call, 10)).server_id == control_addr

    la_addr = unused_address()
    with InteropBackend() as backend:
        async with aio_flavour(flavour, la_addr) as ch:
            call = test_pb2_grpc.TestServiceStub(ch).UnaryCall(
                messages_pb2.SimpleRequest(), timeout=10, wait_for_ready=True
            )
            task = asyncio.ensure_future(call.code())
            done, _ = await asyncio.wait({task}, timeout=0.3)
            assert not done, f"ended with {task.result()} instead of waiting"
            with serve_lookaside([], port=int(la_addr.rsplit(":", 1)[1])) as la:
                done, _ = await asyncio.wait({task}, timeout=0.3)
                assert not done
                la.servicer.set_endpoints([backend.address])
                assert (await asyncio.wait_for(call, 10)).server_id == backend.address


@pytest.mark.parametrize("flavour", SYNC_FACTORIES)
def test_03_wait_for_ready_ends_at_the_deadline(flavour: str) -> None:
    """wait_for_ready=True with nothing ever ready ends DEADLINE_EXCEEDED at the deadline, as a plain
    channel."""
    with grpc.insecure_channel(unused_address()) as plain:
        control = sync_call(plain, timeout=0.5, wait_for_ready=True)
    with sync_flavour(flavour, unused_address()) as ch:
        got = sync_call(ch, timeout=0.5, wait_for_ready=True)
    assert control.code is DEADLINE_EXCEEDED
    assert got.code is control.code
    assert 0.4 < got.elapsed < 1.5, got.elapsed


# ======================================== 4. close and leaks


# grpcio 1.85 segfaults when a stub is built on a closed plain channel (registered methods): every stub here
# is built before its channel is closed, and the calls made after close() go through it.


def test_04_closed_channel_raises_value_error_while_another_shares_its_balancer(world: World) -> None:
    """New calls on a closed channel raise ValueError, as on a closed plain channel, even while another
    channel with the same settings (sharing its balancer) stays open and keeps working."""
    plain = grpc.insecure_channel(world.addresses[0])
    plain_stub = test_pb2_grpc.TestServiceStub(plain)
    plain.close()
    with pytest.raises(ValueError):
        plain_stub.UnaryCall(messages_pb2.SimpleRequest(), timeout=5)

    service = fresh_service()
    with sync_flavour("sync_watch", world.lookaside.address, service=service) as other:
        first = lookaside_grpc.channel(service, namespace=NS, lookaside=world.lookaside.address)
        stub = test_pb2_grpc.TestServiceStub(first)
        assert stub.UnaryCall(messages_pb2.SimpleRequest(), timeout=5).server_id in world.addresses
        first.close()
        for call in (
            lambda: stub.UnaryCall(messages_pb2.SimpleRequest(), timeout=5),
            lambda: list(stub.StreamingOutputCall(messages_pb2.StreamingOutputCallRequest(), timeout=5)),
        ):
            with pytest.raises(ValueError):
                call()
        assert sync_call(other).code is OK  # the sharing channel is unaffected


async def test_04_aio_closed_channel_raises_as_a_plain_one(world: World) -> None:
    plain = grpc.aio.insecure_channel(world.addresses[0])
    plain_stub = test_pb2_grpc.TestServiceStub(plain)
    await plain.close()
    with pytest.raises(Exception) as control:  # noqa: PT011 - compared with ours below
        await plain_stub.UnaryCall(messages_pb2.SimpleRequest(), timeout=5)

    service = fresh_service()
    async with aio_flavour("aio_watch", world.lookaside.address, service=service) as other:
        first = lookaside_grpc.aio.channel(service, namespace=NS, lookaside=world.lookaside.address)
        stub = test_pb2_grpc.TestServiceStub(first)
        assert (await stub.UnaryCall(messages_pb2.SimpleRequest(), timeout=5)).server_id in world.addresses
        await first.close()
        with pytest.raises(Exception) as got:  # noqa: PT011 - compared with the control's
            await stub.UnaryCall(messages_pb2.SimpleRequest(), timeout=5)
        assert type(got.value) is type(control.value), (got.value, control.value)
        assert (await aio_call(other)).code is OK


def test_04_sync_interceptor_close_and_context_manager(greet: World) -> None:
    la = greet.lookaside.servicer
    service = fresh_service()
    before = la.active_watches
    with lookaside_grpc.LookasideInterceptor(
        lookaside=greet.lookaside.address, routes=greet.routes(service)
    ) as icpt:
        with grpc.intercept_channel(grpc.insecure_channel(greet.fallback.address), icpt) as ch:
            assert greet.call(ch).served_by in greet.addresses
            wait_until(lambda: la.active_watches > before)
    wait_until(lambda: la.active_watches == before)  # the context manager closed the interceptor

    icpt = lookaside_grpc.LookasideInterceptor(
        lookaside=greet.lookaside.address, routes=greet.routes(fresh_service())
    )
    with grpc.intercept_channel(grpc.insecure_channel(greet.fallback.address), icpt) as ch:
        assert greet.call(ch).served_by in greet.addresses
        icpt.close()
    wait_until(lambda: la.active_watches == before)


async def test_04_aio_interceptors_close_and_context_manager(greet: World) -> None:
    la = greet.lookaside.servicer
    before = la.active_watches
    icpt = lookaside_grpc.aio.LookasideInterceptor(greet.lookaside.address, greet.routes(fresh_service()))
    async with icpt:
        async with grpc.aio.insecure_channel(greet.fallback.address, interceptors=icpt.interceptors) as ch:
            assert (await greet.acall(ch)).served_by in greet.addresses
            await await_until(lambda: la.active_watches > before)
    await await_until(lambda: la.active_watches == before)

    icpts = lookaside_grpc.aio.interceptors(
        lookaside=greet.lookaside.address, routes=greet.routes(fresh_service())
    )
    async with grpc.aio.insecure_channel(greet.fallback.address, interceptors=icpts) as ch:
        assert (await greet.acall(ch)).served_by in greet.addresses
        await icpts[0].close()
    await await_until(lambda: la.active_watches == before)


@pytest.mark.parametrize("flavour", ["sync_watch", "sync_per_call", "sync_interceptor"])
def test_04_dropped_without_close_leaks_nothing(greet: World, flavour: str) -> None:
    """A channel (or interceptor) dropped without close(): its balancer stops its threads and its Watch."""
    la = greet.lookaside.servicer
    watches = la.active_watches
    with sync_flavour(
        flavour, greet.lookaside.address, greet.fallback.address, routes_for=greet.routes
    ) as warm:
        for shape in SHAPES:  # process-wide threads the library may start once, and the servers' pools
            assert greet.call(warm, shape).code is OK
    wait_until(lambda: la.active_watches <= watches)  # the warm-up channel is closed and gone
    base_threads, base_watches = threads(), la.active_watches
    service = fresh_service()
    if flavour == "sync_interceptor":
        icpt = lookaside_grpc.LookasideInterceptor(
            lookaside=greet.lookaside.address, routes=greet.routes(service)
        )
        ch: Any = grpc.intercept_channel(grpc.insecure_channel(greet.fallback.address), icpt)
        del icpt
    else:
        ch = lookaside_grpc.channel(
            service, namespace=NS, lookaside=greet.lookaside.address, mode=mode(flavour.removeprefix("sync_"))
        )
    for shape in SHAPES:
        assert greet.call(ch, shape).served_by in greet.addresses
    del ch
    wait_until(lambda: threads() <= base_threads and la.active_watches <= base_watches, timeout=10)


async def test_04_aio_dropped_without_close_leaks_nothing(greet: World) -> None:
    la = greet.lookaside.servicer
    base_watches = la.active_watches
    ch = lookaside_grpc.aio.channel(fresh_service(), namespace=NS, lookaside=greet.lookaside.address)
    for shape in SHAPES:
        assert (await greet.acall(ch, shape)).served_by in greet.addresses
    await await_until(lambda: la.active_watches > base_watches)
    del ch

    def gone() -> bool:
        gc.collect()
        return la.active_watches <= base_watches

    await await_until(gone, timeout=10)


# ======================================== 5. connectivity


@pytest.mark.parametrize("flavour", SYNC_FACTORIES)
def test_05_ready_only_with_a_ready_endpoint(flavour: str) -> None:
    """channel_ready_future and subscribe report READY only once the target has a ready endpoint, not for
    a mere connection to the lookaside: as a plain channel is READY only once its server is up."""
    backend_addr = unused_address()
    with grpc.insecure_channel(backend_addr) as plain:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(plain).result(timeout=0.5)
        with InteropBackend(port=int(backend_addr.rsplit(":", 1)[1])):
            grpc.channel_ready_future(plain).result(timeout=10)

    with InteropBackend() as backend, serve_lookaside([]) as la:
        with sync_flavour(flavour, la.address) as ch:
            states: list[grpc.ChannelConnectivity] = []
            ch.subscribe(states.append, try_to_connect=True)
            try:
                with pytest.raises(grpc.FutureTimeoutError):
                    grpc.channel_ready_future(ch).result(timeout=0.5)
                assert grpc.ChannelConnectivity.READY not in states
                la.servicer.set_endpoints([backend.address])
                grpc.channel_ready_future(ch).result(timeout=10)
                wait_until(lambda: states[-1:] == [grpc.ChannelConnectivity.READY])
            finally:
                ch.unsubscribe(states.append)


@pytest.mark.parametrize("flavour", AIO_FACTORIES)
async def test_05_aio_ready_only_with_a_ready_endpoint(flavour: str) -> None:
    with InteropBackend() as backend, serve_lookaside([]) as la:
        async with aio_flavour(flavour, la.address) as ch:
            ch.get_state(try_to_connect=True)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ch.channel_ready(), 0.5)
            assert ch.get_state() is not grpc.ChannelConnectivity.READY
            la.servicer.set_endpoints([backend.address])
            await asyncio.wait_for(ch.channel_ready(), 10)
            assert ch.get_state() is grpc.ChannelConnectivity.READY


# ======================================== 6. wrapped channel's options

FIVE_MB = 5 * 1024 * 1024
BIG = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]


@contextmanager
def big_greet() -> Iterator[World]:
    """Greet backends accepting 16 MB requests, a fallback and a lookaside naming the three."""
    backends = [GreetBackend(options=BIG) for _ in range(3)]
    fallback = GreetBackend(options=BIG)
    lookaside = serve_lookaside([b.address for b in backends])
    try:
        yield World(backends, fallback, lookaside, greet_call, greet_aio_call, greet_routes)
    finally:
        lookaside.stop()
        for b in [*backends, fallback]:
            b.stop()


def test_06_interceptor_dials_backends_with_the_wrapped_channels_options() -> None:
    """A 5 MB reply works on the plain channel with max_receive_message_length=16MB (and fails without);
    balanced it works too, answered by a balanced backend: through ``intercepted_channel`` (the original
    channel and the backends built from the same options) and through ``grpc.intercept_channel`` with the
    options given to both. (grpc exposes no channel's own options, so an interceptor cannot read them off
    the channel it wraps.)"""
    name = "x" * FIVE_MB
    with big_greet() as w:
        with grpc.insecure_channel(w.addresses[0]) as small:
            assert w.call(small, name=name, timeout=10).code is grpc.StatusCode.RESOURCE_EXHAUSTED
        with grpc.insecure_channel(w.addresses[0], options=BIG) as plain:
            assert w.call(plain, name=name, timeout=10).served_by == w.addresses[0]
        with lookaside_grpc.intercepted_channel(
            w.fallback.address, w.routes(fresh_service()), lookaside=w.lookaside.address, options=BIG
        ) as ch:
            got = w.call(ch, name=name, timeout=10)
        assert (got.code, got.details) == (OK, None)
        assert got.served_by in w.addresses
        with sync_flavour(
            "sync_interceptor",
            w.lookaside.address,
            w.fallback.address,
            original_options=BIG,
            routes_for=w.routes,
            options=BIG,
        ) as ch:
            got = w.call(ch, name=name, timeout=10)
        assert (got.code, got.details) == (OK, None)
        assert got.served_by in w.addresses


async def test_06_aio_interceptors_dial_backends_with_the_wrapped_channels_options() -> None:
    name = "x" * FIVE_MB
    with big_greet() as w:
        async with grpc.aio.insecure_channel(w.addresses[0], options=BIG) as plain:
            assert (await w.acall(plain, name=name, timeout=10)).served_by == w.addresses[0]
        ch, icpt = lookaside_grpc.aio.intercepted_channel(
            w.fallback.address, w.routes(fresh_service()), lookaside=w.lookaside.address, options=BIG
        )
        async with icpt, ch:
            got = await w.acall(ch, name=name, timeout=10)
        assert (got.code, got.details) == (OK, None)
        assert got.served_by in w.addresses
        async with aio_flavour(
            "aio_interceptors",
            w.lookaside.address,
            w.fallback.address,
            original_options=BIG,
            routes_for=w.routes,
            options=BIG,
        ) as ch:
            got = await w.acall(ch, name=name, timeout=10)
        assert (got.code, got.details) == (OK, None)
        assert got.served_by in w.addresses


def test_06_factory_options_reach_the_backend_channels(world: World) -> None:
    big = messages_pb2.SimpleRequest(response_size=FIVE_MB)
    with sync_flavour("sync_watch", world.lookaside.address, options=BIG) as ch:
        assert len(test_pb2_grpc.TestServiceStub(ch).UnaryCall(big, timeout=10).payload.body) == FIVE_MB


# ======================================== 7. interceptor fallback at once


def test_07_interceptor_falls_back_at_once_while_the_lookaside_is_unreachable(greet: World) -> None:
    """While the lookaside is unreachable, calls go to the original channel at once after the first
    failure (not after route_wait each), and are balanced again once it answers."""
    la_addr = unused_address()
    with sync_flavour("sync_interceptor", la_addr, greet.fallback.address, routes_for=greet.routes) as ch:
        first = greet.call(ch)
        assert first.served_by == greet.fallback.address
        later = [greet.call(ch) for _ in range(20)]
        assert {r.served_by for r in later} == {greet.fallback.address}
        slowest = max(r.elapsed for r in later)
        assert slowest < 0.25, f"slowest fallback call {slowest * 1000:.0f} ms (route_wait is 1 s)"
        with serve_lookaside(greet.addresses, port=int(la_addr.rsplit(":", 1)[1])):
            wait_until(lambda: greet.call(ch).served_by in greet.addresses, timeout=10)


async def test_07_aio_interceptors_fall_back_at_once_while_the_lookaside_is_unreachable(greet: World) -> None:
    la_addr = unused_address()
    async with aio_flavour(
        "aio_interceptors", la_addr, greet.fallback.address, routes_for=greet.routes
    ) as ch:
        first = await greet.acall(ch)
        assert first.served_by == greet.fallback.address
        later = [await greet.acall(ch) for _ in range(20)]
        assert {r.served_by for r in later} == {greet.fallback.address}
        slowest = max(r.elapsed for r in later)
        assert slowest < 0.25, f"slowest fallback call {slowest * 1000:.0f} ms (route_wait is 1 s)"
        with serve_lookaside(greet.addresses, port=int(la_addr.rsplit(":", 1)[1])):

            async def balanced() -> bool:
                return (await greet.acall(ch)).served_by in greet.addresses

            await await_until(balanced, timeout=10)


# ======================================== 8. random start

FRESH_CHANNELS = 300


@pytest.mark.parametrize("flavour", ["sync_watch", "sync_interceptor"])
def test_08_round_robin_starts_at_a_random_position_per_channel(greet: World, flavour: str) -> None:
    """300 fresh channels (nothing shared between them) making one call each over 3 backends land about
    100 each (binomial: 60..140 is beyond 5 standard deviations), as C-core's round_robin does."""
    spread: Counter[str] = Counter()
    for _ in range(FRESH_CHANNELS):
        with sync_flavour(
            flavour, greet.lookaside.address, greet.fallback.address, routes_for=greet.routes
        ) as ch:
            spread[greet.call(ch).served_by] += 1
    assert sum(spread.values()) == FRESH_CHANNELS
    assert set(spread) <= set(greet.addresses), spread
    assert all(60 <= spread[a] <= 140 for a in greet.addresses), spread


async def test_08_aio_round_robin_starts_at_a_random_position_per_channel(greet: World) -> None:
    spread: Counter[str] = Counter()
    for _ in range(FRESH_CHANNELS):
        async with aio_flavour("aio_watch", greet.lookaside.address) as ch:
            spread[(await greet.acall(ch)).served_by] += 1
    assert sum(spread.values()) == FRESH_CHANNELS
    assert set(spread) <= set(greet.addresses), spread
    assert all(60 <= spread[a] <= 140 for a in greet.addresses), spread


# ======================================== 9. service-only .proto


def test_09_service_only_proto_is_balanced_by_the_sync_interceptor(world: World) -> None:
    """test.proto holds only the service, its messages imported: every shape is balanced, none falls back."""
    before = world.fallback.servicer.total()
    with sync_flavour("sync_interceptor", world.lookaside.address, world.fallback.address) as ch:
        served = [sync_call(ch, shape).served_by for shape in SHAPES]
    assert all(s in world.addresses for s in served), served
    assert world.fallback.servicer.total() == before


async def test_09_service_only_proto_is_balanced_by_the_aio_interceptors(world: World) -> None:
    before = world.fallback.servicer.total()
    async with aio_flavour("aio_interceptors", world.lookaside.address, world.fallback.address) as ch:
        served = [(await aio_call(ch, shape)).served_by for shape in SHAPES]
    assert all(s in world.addresses for s in served), served
    assert world.fallback.servicer.total() == before


_ITEM9_SCRIPT = """
import asyncio, json, sys
import grpc, grpc.aio
import lookaside_grpc, lookaside_grpc.aio
from lookaside_dev.interop.server import InteropBackend, SERVICE
from lookaside_dev.interop.v1 import messages_pb2 as m, test_pb2_grpc  # as an application: no test_pb2
from lookaside_dev.silent import serve_lookaside

assert "lookaside_dev.interop.v1.test_pb2" not in sys.modules
backends = [InteropBackend() for _ in range(3)]
fallback = InteropBackend()
la = serve_lookaside([b.address for b in backends])
routes = {SERVICE: "interop.default"}
unary = m.SimpleRequest()
out_req = m.StreamingOutputCallRequest(response_parameters=[m.ResponseParameters(size=1)])
in_req = m.StreamingInputCallRequest()
result = {"balanced": sorted(b.address for b in backends)}
icpt = lookaside_grpc.LookasideInterceptor(lookaside=la.address, routes=routes)
with grpc.intercept_channel(grpc.insecure_channel(fallback.address), icpt) as ch:
    stub = test_pb2_grpc.TestServiceStub(ch)
    result["sync"] = [
        stub.UnaryCall(unary, timeout=5).server_id,
        next(iter(stub.StreamingOutputCall(out_req, timeout=5))).server_id,
        stub.StreamingInputCall(iter([in_req]), timeout=5).server_id,
        next(iter(stub.FullDuplexCall(iter([out_req]), timeout=5))).server_id,
    ]
icpt.close()


async def aio():
    icpt = lookaside_grpc.aio.LookasideInterceptor(lookaside=la.address, routes=routes)
    async with grpc.aio.insecure_channel(fallback.address, interceptors=icpt.interceptors) as ch:
        stub = test_pb2_grpc.TestServiceStub(ch)
        result["aio"] = [
            (await stub.UnaryCall(unary, timeout=5)).server_id,
            [r async for r in stub.StreamingOutputCall(out_req, timeout=5)][0].server_id,
            (await stub.StreamingInputCall(iter([in_req]), timeout=5)).server_id,
            [r async for r in stub.FullDuplexCall(iter([out_req]), timeout=5)][0].server_id,
        ]
    await icpt.close()


asyncio.run(aio())
result["fallback_calls"] = fallback.servicer.total()
la.stop()
for b in [*backends, fallback]:
    b.stop()
print(json.dumps(result))
"""


def test_09_service_only_proto_in_a_fresh_process() -> None:
    """As an application does it: a process that imports only the generated ``test_pb2_grpc`` (never
    ``test_pb2``, the service's own file) balances every shape through both interceptors. In a fresh process,
    because any earlier import of ``test_pb2`` in this one would hide the bug."""
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", _ITEM9_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fallback_calls"] == 0, result
    for flavour in ("sync", "aio"):
        assert all(s in result["balanced"] for s in result[flavour]), (flavour, result)


def test_09_unresolvable_route_warns_once_and_strict_raises(
    greet: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A route naming a gRPC service the client cannot resolve: one WARNING naming it, its calls counted as
    fallbacks (the other routes still balanced); ``strict=True`` raises at construction instead."""
    bogus = "no.such.v1.Service"
    with caplog.at_level(logging.WARNING, logger="lookaside_grpc"):
        icpt = lookaside_grpc.LookasideInterceptor(
            lookaside=greet.lookaside.address,
            routes={bogus: "greet.default", **greet.routes(fresh_service())},
        )
        with grpc.intercept_channel(grpc.insecure_channel(greet.fallback.address), icpt) as ch:
            for _ in range(3):
                with pytest.raises(grpc.RpcError):
                    ch.unary_unary(f"/{bogus}/Call")(b"", timeout=5)
            assert greet.call(ch).served_by in greet.addresses
        icpt.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and bogus in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert sum(icpt.stats().fallbacks.values()) >= 3
    with pytest.raises(ValueError, match=bogus):
        lookaside_grpc.LookasideInterceptor(
            lookaside=greet.lookaside.address, routes={bogus: "x.default"}, strict=True
        )
    with pytest.raises(ValueError, match=bogus):
        lookaside_grpc.aio.interceptors(
            lookaside=greet.lookaside.address, routes={bogus: "x.default"}, strict=True
        )


# ======================================== 10. OpenTelemetry


_EXPORTER: Any = None


def _span_exporter() -> Any:
    """One in-memory exporter on the global tracer provider (the sync client instrumentation ignores
    ``instrument(tracer_provider=...)`` and uses the global one, which can be set once per process)."""
    global _EXPORTER
    if _EXPORTER is None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        if not isinstance(trace.get_tracer_provider(), TracerProvider):
            trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
        assert isinstance(provider, TracerProvider), provider
        _EXPORTER = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    return _EXPORTER


@pytest.fixture
def otel() -> Iterator[Any]:
    """OpenTelemetry's gRPC client instrumentation (sync and aio) active for the test; its span exporter."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcInstrumentorClient

    exporter = _span_exporter()
    exporter.clear()
    sync_instr, aio_instr = GrpcInstrumentorClient(), GrpcAioInstrumentorClient()
    sync_instr.instrument()
    aio_instr.instrument(tracer_provider=trace.get_tracer_provider())
    try:
        yield exporter
    finally:
        sync_instr.uninstrument()
        aio_instr.uninstrument()


def _client_spans(exporter: Any) -> int:
    from opentelemetry.trace import SpanKind

    return sum(1 for span in exporter.get_finished_spans() if span.kind is SpanKind.CLIENT)


@pytest.mark.parametrize("flavour", ["sync_watch", "sync_per_call", "sync_interceptor"])
def test_10_opentelemetry_instrumentation(greet: World, otel: Any, flavour: str) -> None:
    """With GrpcInstrumentorClient active (it wraps grpc.insecure_channel), every call shape and close()
    work: calls are balanced and traced, as on a plain channel, and close() stops the Watch and threads."""
    with grpc.insecure_channel(greet.addresses[0]) as plain:  # the control: traced, one span per call
        assert [greet.call(plain, shape).code for shape in SHAPES] == [OK] * len(SHAPES)
    control_spans = _client_spans(otel)
    assert control_spans == len(SHAPES)
    la = greet.lookaside.servicer
    base_threads, base_watches = threads(), la.active_watches
    with sync_flavour(
        flavour, greet.lookaside.address, greet.fallback.address, routes_for=greet.routes
    ) as ch:
        results = {shape: greet.call(ch, shape) for shape in SHAPES}
    assert {s: r.code for s, r in results.items()} == dict.fromkeys(SHAPES, OK), results
    assert all(r.served_by in greet.addresses for r in results.values()), results
    assert _client_spans(otel) - control_spans >= len(SHAPES)
    wait_until(lambda: threads() <= base_threads and la.active_watches <= base_watches, timeout=10)


@pytest.mark.parametrize("flavour", ["aio_watch", "aio_interceptors"])
async def test_10_aio_opentelemetry_instrumentation(greet: World, otel: Any, flavour: str) -> None:
    la = greet.lookaside.servicer
    base_watches = la.active_watches
    async with aio_flavour(
        flavour, greet.lookaside.address, greet.fallback.address, routes_for=greet.routes
    ) as ch:
        results = {shape: await greet.acall(ch, shape) for shape in SHAPES}
    assert {s: r.code for s, r in results.items()} == dict.fromkeys(SHAPES, OK), results
    assert all(r.served_by in greet.addresses for r in results.values()), results
    assert _client_spans(otel) >= len(SHAPES)
    await await_until(lambda: la.active_watches <= base_watches, timeout=10)


# ======================================== 11. silent lookaside

STALENESS = 1.0
KEEPALIVE = 0.25


@pytest.mark.parametrize("flavour", ["sync_watch", "sync_per_call", "sync_interceptor"])
def test_11_silent_lookaside_is_detected_and_max_staleness_holds(greet: World, flavour: str) -> None:
    """The lookaside goes silent with its connection left open (a frozen proxy: a stopped process or a
    partition). Calls keep working from the last set for about max_staleness, then the factory fails them
    UNAVAILABLE and the interceptor uses its original channel; when the lookaside answers again the client
    reconnects and balances again. A healthy but quiet lookaside (no endpoint change for longer than
    max_staleness) is not taken for a silent one."""
    stale_code = OK if flavour == "sync_interceptor" else UNAVAILABLE

    def stale(r: Result) -> bool:
        return r.code is stale_code and r.served_by not in greet.addresses

    with FreezableProxy(greet.lookaside.address) as proxy:
        with sync_flavour(
            flavour,
            proxy.address,
            greet.fallback.address,
            routes_for=greet.routes,
            max_staleness=STALENESS,
            lookaside_keepalive=KEEPALIVE,
        ) as ch:
            quiet_until = time.monotonic() + 2 * STALENESS
            while time.monotonic() < quiet_until:  # healthy and quiet: still balanced
                r = greet.call(ch, timeout=2)
                assert r.served_by in greet.addresses, r
                threading.Event().wait(0.05)
            proxy.freeze()
            frozen_at = time.monotonic()
            first_stale = None
            while time.monotonic() < frozen_at + STALENESS + 2 * KEEPALIVE + 5:
                r = greet.call(ch, timeout=2)
                if stale(r):
                    first_stale = time.monotonic() - frozen_at
                    break
                assert r.served_by in greet.addresses, r  # the last set, until it is stale
                threading.Event().wait(0.02)
            assert first_stale is not None, "calls kept using the unconfirmed set"
            assert first_stale >= STALENESS - 2 * KEEPALIVE, f"stale after {first_stale:.2f}s only"
            proxy.thaw()
            wait_until(lambda: greet.call(ch, timeout=2).served_by in greet.addresses, timeout=15)


async def test_11_aio_silent_lookaside_is_detected_and_max_staleness_holds(greet: World) -> None:
    with FreezableProxy(greet.lookaside.address) as proxy:
        async with aio_flavour(
            "aio_watch", proxy.address, max_staleness=STALENESS, lookaside_keepalive=KEEPALIVE
        ) as ch:
            assert (await greet.acall(ch)).served_by in greet.addresses
            proxy.freeze()
            frozen_at = time.monotonic()

            async def failing() -> bool:
                return (await greet.acall(ch, timeout=2)).code is UNAVAILABLE

            await await_until(failing, timeout=STALENESS + 2 * KEEPALIVE + 5)
            assert time.monotonic() - frozen_at >= STALENESS - 2 * KEEPALIVE
            proxy.thaw()

            async def balanced() -> bool:
                return (await greet.acall(ch, timeout=2)).served_by in greet.addresses

            await await_until(balanced, timeout=15)


# ======================================== 12. retry with a dead pod

RETRY_CALLS = 20


@pytest.mark.parametrize("shape", ["unary_unary", "unary_stream"])
@pytest.mark.parametrize("flavour", SYNC_FLAVOURS)
def test_12_calls_retry_past_a_dead_pod(greet: World, flavour: str, shape: str) -> None:
    """One dead pod of four: every unary-unary and unary-stream call that fails before any response is
    retried on another endpoint, in every flavour; none fails."""
    with serve_lookaside([*greet.addresses, unused_address()]) as la:
        with sync_flavour(flavour, la.address, greet.fallback.address, routes_for=greet.routes) as ch:
            results = [greet.call(ch, shape) for _ in range(RETRY_CALLS)]
    assert [r.code for r in results] == [OK] * RETRY_CALLS, [
        (r.code, r.details) for r in results if r.code is not OK
    ]
    assert all(r.served_by in greet.addresses for r in results)


@pytest.mark.parametrize("shape", ["unary_unary", "unary_stream"])
@pytest.mark.parametrize("flavour", AIO_FLAVOURS)
async def test_12_aio_calls_retry_past_a_dead_pod(greet: World, flavour: str, shape: str) -> None:
    with serve_lookaside([*greet.addresses, unused_address()]) as la:
        async with aio_flavour(flavour, la.address, greet.fallback.address, routes_for=greet.routes) as ch:
            results = [await greet.acall(ch, shape) for _ in range(RETRY_CALLS)]
    assert [r.code for r in results] == [OK] * RETRY_CALLS, [
        (r.code, r.details) for r in results if r.code is not OK
    ]
    assert all(r.served_by in greet.addresses for r in results)


# ======================================== 13. no growth under churn

REFUSING = 2000


def refusing_endpoints(n: int) -> list[str]:
    """``n`` loopback addresses nothing listens on (port 1 of 127.0.x.y): each refuses at once."""
    return [f"127.0.{i // 250 + 1}.{i % 250 + 1}:1" for i in range(n)]


def test_13_refusing_endpoints_add_no_threads() -> None:
    """2,000 refusing endpoints, each tried and ejected: ejection cool-downs need no thread per address."""
    with serve_lookaside(refusing_endpoints(REFUSING)) as la:
        with sync_flavour("sync_watch", la.address) as ch:
            assert sync_call(ch, timeout=2).code is UNAVAILABLE
            base = threads()
            codes = Counter(sync_call(ch, timeout=2).code for _ in range(REFUSING))
            grown = threads() - base
    assert set(codes) == {UNAVAILABLE}, codes
    assert grown <= 10, f"{grown} threads added by {REFUSING} refusing endpoints"


CHURN = 10_000


def _live(*kinds: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kinds))


MULTICALLABLES = (
    grpc.UnaryUnaryMultiCallable,
    grpc.UnaryStreamMultiCallable,
    grpc.StreamUnaryMultiCallable,
    grpc.StreamStreamMultiCallable,
)


def test_13_per_method_caches_forget_retired_addresses() -> None:
    """10,000 endpoints come and go (two at a time, a call after each change, one stub throughout): the
    per-method caches keep nothing for addresses the pool has retired, so live backend channels and
    multicallables stay bounded."""
    with serve_lookaside(refusing_endpoints(1)) as la:
        with sync_flavour("sync_watch", la.address) as ch:
            stub = test_pb2_grpc.TestServiceStub(ch)
            with pytest.raises(grpc.RpcError):
                stub.UnaryCall(messages_pb2.SimpleRequest(), timeout=2)
            base_mc, base_ch = _live(*MULTICALLABLES), _live(grpc.Channel)
            addresses = refusing_endpoints(CHURN)
            for i in range(0, CHURN, 2):
                la.servicer.set_endpoints(addresses[i : i + 2])
                with pytest.raises(grpc.RpcError):
                    stub.UnaryCall(messages_pb2.SimpleRequest(), timeout=2)
            picked = len(ch.stats().picks)
            grown_mc, grown_ch = _live(*MULTICALLABLES) - base_mc, _live(grpc.Channel) - base_ch
    assert picked > CHURN // 10, f"only {picked} addresses were picked: the churn did not happen"
    assert grown_mc <= 50, (
        f"{grown_mc} backend multicallables alive after {CHURN} endpoints ({picked} picked)"
    )
    assert grown_ch <= 50, f"{grown_ch} backend channels alive after {CHURN} endpoints ({picked} picked)"


# ======================================== 14. defaults


def test_14_lookaside_addr_nullhandler_and_version(greet: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKASIDE_ADDR", greet.lookaside.address)
    ch = lookaside_grpc.channel(fresh_service(), namespace=NS)
    try:
        assert greet.call(ch).served_by in greet.addresses
    finally:
        ch.close()
    handlers = logging.getLogger("lookaside_grpc").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers), handlers
    assert lookaside_grpc.__version__ == importlib.metadata.version("lookaside-grpc")


async def test_14_aio_reads_lookaside_addr(greet: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKASIDE_ADDR", greet.lookaside.address)
    async with lookaside_grpc.aio.channel(fresh_service(), namespace=NS) as ch:
        assert (await greet.acall(ch)).served_by in greet.addresses
    icpt = lookaside_grpc.LookasideInterceptor(routes=greet.routes(fresh_service()))
    with grpc.intercept_channel(grpc.insecure_channel(greet.fallback.address), icpt) as ch:
        assert greet.call(ch).served_by in greet.addresses
    icpt.close()
    assert os.environ["LOOKASIDE_ADDR"] == greet.lookaside.address
