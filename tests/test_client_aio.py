"""The grpc.aio lookaside channel against real Greet backends and a fake (real gRPC) lookaside."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import grpc.aio
import pytest

import lookaside_grpc.aio
from examples.greet import greet_pb2, greet_pb2_grpc
from lookaside_dev.fakes import Backends, RunningLookaside, greetings, req, unused_address


@pytest.fixture
def backends() -> Iterator[Backends]:
    with Backends(3) as b:
        yield b


@pytest.fixture
def lookaside(backends: Backends) -> Iterator[RunningLookaside]:
    with RunningLookaside(backends.addresses) as la:
        yield la


def make(la: RunningLookaside | str, **kwargs: object) -> lookaside_grpc.aio.Channel:
    address = la if isinstance(la, str) else la.address
    return lookaside_grpc.aio.channel("greet", lookaside=address, **kwargs)  # type: ignore[arg-type]


async def poll(cond: object, timeout: float = 5.0) -> None:
    """Await until ``cond()`` is true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


async def agreetings(*names: str) -> AsyncIterator[greet_pb2.GreetingRequest]:
    for name in names:
        yield greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name=name, last_name="X"))


async def test_all_call_shapes_deferred_then_direct(backends: Backends, lookaside: RunningLookaside) -> None:
    async with make(lookaside) as ch:
        assert isinstance(ch, grpc.aio.Channel)
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        first = stub.Greet(req(), timeout=5)
        assert first._call is None  # type: ignore[attr-defined]  # no set yet: waits for the pick
        assert isinstance(first, grpc.aio.UnaryUnaryCall)
        assert (await first).result.startswith("Hello Ada L from 127.0.0.1:")
        assert await first.code() is grpc.StatusCode.OK
        # with a known set the real grpc.aio call starts at once, in a thin wrapper carrying the retry
        call = stub.Greet(req(), timeout=5)
        assert isinstance(call, grpc.aio.UnaryUnaryCall)
        assert type(call._call).__module__.startswith("grpc")  # type: ignore[attr-defined]
        assert (await call).result
        many = [r.result async for r in stub.GreetManyTimes(req("Bo"), timeout=5)]
        assert len(many) == 3 and many[2].endswith("#2")
        assert "b X" in (await stub.LongGreet(agreetings("a", "b"), timeout=5)).result
        assert "c X" in (await stub.LongGreet(greetings("c"), timeout=5)).result
        bidi = stub.GreetEveryone(timeout=5)
        await bidi.write(greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="e")))
        assert (await bidi.read()).result.startswith("Hello e ")
        await bidi.done_writing()
        assert await bidi.read() is grpc.aio.EOF
        assert await bidi.code() is grpc.StatusCode.OK
        assert sum(backends.calls()) == 6


async def test_deferred_streaming_shapes() -> None:
    with Backends(1) as b, RunningLookaside(b.addresses) as la:
        for shape in ("unary_stream", "stream_unary", "stream_stream", "stream_stream_iter"):
            async with make(la) as ch:  # a fresh channel: the first call is always deferred
                stub = greet_pb2_grpc.GreetServiceStub(ch)
                if shape == "unary_stream":
                    call = stub.GreetManyTimes(req(), timeout=5)
                    assert isinstance(call, grpc.aio.UnaryStreamCall)
                    assert (await call.read()).result.endswith("#0")
                    assert (await call.read()).result.endswith("#1")
                    assert (await call.read()).result.endswith("#2")
                    assert await call.read() is grpc.aio.EOF
                elif shape == "stream_unary":
                    call = stub.LongGreet(timeout=5)
                    assert isinstance(call, grpc.aio.StreamUnaryCall)
                    await call.write(greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="w")))
                    await call.done_writing()
                    assert (await call).result.startswith("Hello w ")
                elif shape == "stream_stream":
                    call = stub.GreetEveryone(timeout=5)
                    assert isinstance(call, grpc.aio.StreamStreamCall)
                    await call.write(greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="x")))
                    await call.done_writing()
                    assert [r.result.split(" from")[0] async for r in call] == ["Hello x "]
                else:
                    call = stub.GreetEveryone(agreetings("y", "z"), timeout=5)
                    assert len([r async for r in call]) == 2
                assert await call.code() is grpc.StatusCode.OK
                assert call.done() and not call.cancelled()
                assert isinstance(await call.initial_metadata(), grpc.aio.Metadata)
        assert b.calls() == [4]


async def test_metadata_errors_and_done_callbacks() -> None:
    with Backends(1, echo=True) as b, RunningLookaside(b.addresses) as la:
        async with make(la) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            done = asyncio.Event()
            call = stub.Greet(req(), timeout=5, metadata=(("x-test", "hi"),), wait_for_ready=True)
            call.add_done_callback(lambda c: done.set())
            assert (await call).result.startswith("hi Hello Ada")
            assert ("x-served-by", b.addresses[0]) in tuple(await call.trailing_metadata())
            await asyncio.wait_for(done.wait(), 5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Greet(req("fail"), timeout=5)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == f"asked to fail by {b.addresses[0]}"


async def test_deadline_reaches_the_backend() -> None:
    with Backends(1, delay=1.0) as b, RunningLookaside(b.addresses) as la:
        async with make(la) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Greet(req(), timeout=0.2)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 0.9


async def test_channels_are_reused_and_spread_round_robin(
    backends: Backends, lookaside: RunningLookaside
) -> None:
    async with make(lookaside) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        await stub.Greet(req(), timeout=5)
        await asyncio.gather(*(stub.Greet(req(), timeout=5) for _ in range(299)))
        assert backends.calls() == [100, 100, 100]
        assert backends.connections() == [1, 1, 1]
        assert lookaside.servicer.stats() == {"resolve": 0, "watch": 1, "active_watches": 1}
        await poll(lambda: all(s.in_flight == 0 for s in ch._balancer.pool.slots().values()))


async def test_per_call_and_batched_modes(backends: Backends, lookaside: RunningLookaside) -> None:
    async with make(lookaside, mode="per_call") as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        for _ in range(30):
            await stub.Greet(req(), timeout=5)
        assert lookaside.servicer.stats()["resolve"] == 30
    async with make(lookaside, mode=lookaside_grpc.aio.PerCall(batch=10)) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        for _ in range(30):
            await stub.Greet(req(), timeout=5)
        assert lookaside.servicer.stats()["resolve"] == 33
    assert backends.calls() == [20, 20, 20]
    assert lookaside.servicer.stats()["watch"] == 0


async def test_endpoint_change_moves_traffic_and_retires_channels() -> None:
    with Backends(3) as b, RunningLookaside(b.addresses[:1]) as la:
        a, bb, c = b.addresses
        async with make(la) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            pool = ch._balancer.pool
            await stub.Greet(req(), timeout=5)
            stream = stub.GreetEveryone(timeout=10)
            await stream.write(req("s1"))
            assert (await stream.read()).result.endswith(a)
            slot_a = pool.slots()[a]
            assert slot_a.in_flight == 1

            stop = asyncio.Event()

            async def load() -> int:
                n = 0
                while not stop.is_set():
                    await stub.Greet(req(), timeout=5)
                    n += 1
                return n

            loaders = [asyncio.create_task(load()) for _ in range(4)]
            la.servicer.set_endpoints([a, bb])
            await poll(lambda: b.calls()[1] > 0)
            la.servicer.set_endpoints([bb, c])
            await poll(lambda: a not in pool.addresses())
            calls_a = b.calls()[0]
            await poll(lambda: b.calls()[2] > 20)
            stop.set()
            assert all(n > 0 for n in await asyncio.gather(*loaders))  # no call failed
            assert b.calls()[0] == calls_a
            assert slot_a.retired and not slot_a.closed and slot_a.in_flight == 1
            await stream.write(req("s2"))
            assert (await stream.read()).result.endswith(a)
            await stream.done_writing()
            assert await stream.code() is grpc.StatusCode.OK
            await poll(lambda: slot_a.closed)
            assert b.connections() == [1, 1, 1]


@pytest.mark.parametrize("mode", ["watch", "per_call"])
async def test_empty_set_is_unavailable(mode: str) -> None:
    with RunningLookaside([]) as la:
        async with make(la, mode=mode) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Greet(req(), timeout=3)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - start < 2.5
            call = stub.GreetManyTimes(req(), timeout=3)
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in call:
                    pass
            assert await call.code() is grpc.StatusCode.UNAVAILABLE
            assert call.done()


@pytest.mark.parametrize("mode", ["watch", "per_call"])
async def test_unreachable_lookaside_fails_within_the_deadline(mode: str) -> None:
    async with make(unused_address(), mode=mode) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Greet(req(), timeout=0.5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "greet.default" in (err.value.details() or "")
        assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("mode", ["per_call", "watch"])
async def test_not_found_passes_through(mode: str) -> None:
    with RunningLookaside([]) as la:
        la.servicer.resolve_error = la.servicer.watch_error = (grpc.StatusCode.NOT_FOUND, "no such service")
        async with make(la, mode=mode) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await greet_pb2_grpc.GreetServiceStub(ch).Greet(req(), timeout=3)
            assert err.value.code() is grpc.StatusCode.NOT_FOUND
            assert err.value.details() == "no such service"


async def test_cancel_a_deferred_call() -> None:
    async with make(unused_address()) as ch:
        call = greet_pb2_grpc.GreetServiceStub(ch).Greet(req(), timeout=5)
        fired = asyncio.Event()
        call.add_done_callback(lambda c: fired.set())
        assert call.time_remaining() is not None and not call.done()
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert call.cancelled() and call.done()
        await asyncio.wait_for(fired.wait(), 5)


async def test_close_stops_the_watch_task(backends: Backends, lookaside: RunningLookaside) -> None:
    ch = make(lookaside)
    await greet_pb2_grpc.GreetServiceStub(ch).Greet(req(), timeout=5)
    task = ch._balancer.resolver._task  # type: ignore[attr-defined]
    assert task is not None and not task.done()
    assert ch.get_state() is grpc.ChannelConnectivity.READY
    await ch.close()
    assert task.done()
    deadline = time.monotonic() + 5
    while lookaside.servicer.stats()["active_watches"] and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert lookaside.servicer.stats()["active_watches"] == 0
