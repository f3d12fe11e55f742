"""The transparent retry beyond blocking unary calls: the aio channel factory (unary-unary and unary-stream)
and the sync factory's ``future()`` and unary-stream calls. A backend killed mid-run: calls started after the
kill never fail (retried once on another endpoint), and the dead address is ejected."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

import lookaside_grpc
import lookaside_grpc.aio
from examples.greet import greet_pb2_grpc
from lookaside_dev.fakes import Backends, RunningLookaside, req, unused_address


@pytest.fixture
def three() -> Iterator[Backends]:
    with Backends(3) as b:
        yield b


async def test_aio_backend_killed_mid_run_calls_not_sent_never_fail(three: Backends) -> None:
    dead = three.addresses[0]
    with RunningLookaside(three.addresses) as la:
        async with lookaside_grpc.aio.channel("greet", lookaside=la.address) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            ok = 0
            failed: list[tuple[float, grpc.aio.AioRpcError]] = []
            killed = asyncio.Event()
            killed_at = [float("inf")]
            stop = asyncio.Event()

            async def worker(i: int) -> None:
                nonlocal ok
                for n in range(3000):  # bounded
                    if stop.is_set():
                        return
                    started = time.monotonic()
                    try:
                        if (i + n) % 3 == 0:
                            got = [r.result async for r in stub.GreetManyTimes(req(), timeout=5)]
                            assert len(got) == 3
                        else:
                            assert (await stub.Greet(req(), timeout=5)).result
                        ok += 1
                    except grpc.aio.AioRpcError as e:
                        failed.append((started, e))

            async def until(n: int) -> None:
                target = ok + n
                deadline = time.monotonic() + 10
                while ok < target:
                    assert time.monotonic() < deadline, "calls stalled"
                    await asyncio.sleep(0.005)

            workers = [asyncio.create_task(worker(i)) for i in range(8)]
            try:
                await until(100)
                await asyncio.to_thread(lambda: three.servers[0].stop(None).wait(5))  # dies, still listed
                killed_at[0] = time.monotonic()
                killed.set()
                await until(300)
                st = ch.stats()
                picks = st.picks.get(dead, 0)
                await until(200)
                assert ch.stats().picks.get(dead, 0) <= picks + 8  # ejected: no longer picked
            finally:
                stop.set()
                await asyncio.gather(*workers)
            not_sent = [e for t, e in failed if t >= killed_at[0]]
            in_flight = [e for t, e in failed if t < killed_at[0]]
            assert not_sent == []
            assert all(
                e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE) for e in in_flight
            )
            st = ch.stats()
            assert st.ejections.get(dead, 0) >= 1 and st.retries >= 1


async def test_aio_retry_is_transparent_and_bounded() -> None:
    dead = unused_address()
    with Backends(1) as one, RunningLookaside([dead, *one.addresses]) as la:
        async with lookaside_grpc.aio.channel("greet", lookaside=la.address, policy="round_robin") as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            for _ in range(4):  # whichever endpoint is picked, the call succeeds
                call = stub.Greet(req(), timeout=5)
                assert (await call).result.endswith(one.addresses[0])
                assert await call.code() is grpc.StatusCode.OK
                stream = stub.GreetManyTimes(req(), timeout=5)
                assert [r.result[-2:] async for r in stream] == ["#0", "#1", "#2"]
            assert ch.stats().ejections.get(dead, 0) >= 1 and ch.stats().retries >= 1
            # reader API of unary-stream, and errors that are not retryable pass through unchanged
            stream = stub.GreetManyTimes(req(), timeout=5)
            assert (await stream.read()).result.endswith("#0")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Greet(req("fail"), timeout=5)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    # only one retry: with every endpoint dead the call fails with UNAVAILABLE, within its deadline
    with RunningLookaside([unused_address(), unused_address()]) as la:
        async with lookaside_grpc.aio.channel("greet", lookaside=la.address) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Greet(req(), timeout=2)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - start < 2.5
            assert ch.stats().retries <= 1


def test_sync_future_and_unary_stream_are_retried() -> None:
    dead = unused_address()
    with Backends(1) as one, RunningLookaside([dead, *one.addresses]) as la:
        with lookaside_grpc.channel("greet", lookaside=la.address) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            for _ in range(4):
                fut = stub.Greet.future(req(), timeout=5)
                assert fut.result(timeout=5).result.endswith(one.addresses[0])
                assert fut.code() is grpc.StatusCode.OK and fut.done()
                got = [r.result for r in stub.GreetManyTimes(req(), timeout=5)]
                assert len(got) == 3 and got[0].endswith(f"{one.addresses[0]} #0")
            st = ch.stats()
            assert st.ejections.get(dead, 0) >= 1 and st.retries >= 1
            # a future's done callbacks run once, with the final outcome
            seen: list[grpc.StatusCode] = []
            fut = stub.Greet.future(req("fail"), timeout=5)
            fut.add_done_callback(lambda f: seen.append(f.code()))
            with pytest.raises(grpc.RpcError):
                fut.result(timeout=5)
            assert seen == [grpc.StatusCode.FAILED_PRECONDITION]
