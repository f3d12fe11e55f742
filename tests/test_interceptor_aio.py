"""lookaside_grpc.aio.LookasideInterceptor on an existing grpc.aio channel."""

from __future__ import annotations

import time

import grpc
import grpc.aio
import pytest

import lookaside_grpc.aio
from examples.greet import greet_pb2, greet_pb2_grpc
from lookaside_dev.fakes import Backends, RunningLookaside, req, unused_address

ROUTES = {"greet.GreetService": lookaside_grpc.aio.Target("greet", "default")}


async def test_all_shapes_balanced_over_the_pool() -> None:
    with Backends(3) as b, Backends(1) as orig, RunningLookaside(b.addresses) as la:
        icpt = lookaside_grpc.aio.LookasideInterceptor(la.address, ROUTES)
        assert len(icpt.interceptors) == 4
        async with grpc.aio.insecure_channel(orig.addresses[0], interceptors=icpt.interceptors) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            call = stub.Greet(req(), timeout=5)
            assert (await call).result.startswith("Hello Ada L from 127.0.0.1:")
            assert await call.code() is grpc.StatusCode.OK
            many = [r.result async for r in stub.GreetManyTimes(req("Bo"), timeout=5)]
            assert len(many) == 3 and many[2].endswith("#2")

            async def names():  # type: ignore[no-untyped-def]
                for n in ("a", "b"):
                    yield greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name=n, last_name="X"))

            assert "b X" in (await stub.LongGreet(names(), timeout=5)).result
            bidi = stub.GreetEveryone(timeout=5)
            await bidi.write(greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="e")))
            assert (await bidi.read()).result.startswith("Hello e ")
            await bidi.done_writing()
            assert await bidi.code() is grpc.StatusCode.OK
            for _ in range(296):
                await stub.Greet(req(), timeout=5)
            assert b.calls() == [100, 100, 100]
            assert b.connections() == [1, 1, 1]
            assert orig.calls() == [0]
        await icpt.close()


async def test_metadata_errors_deadlines_and_fallbacks() -> None:
    with Backends(1, echo=True) as b, Backends(1) as orig, RunningLookaside(b.addresses) as la:
        icpts = lookaside_grpc.aio.interceptors(la.address, {"greet.GreetService": "greet.default"})
        async with grpc.aio.insecure_channel(orig.addresses[0], interceptors=icpts) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            call = stub.Greet(req(), timeout=5, metadata=(("x-test", "hi"),))
            assert (await call).result.startswith("hi Hello Ada")
            assert ("x-served-by", b.addresses[0]) in tuple(await call.trailing_metadata())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Greet(req("fail"), timeout=5)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == f"asked to fail by {b.addresses[0]}"
        await icpts[0].close()
        assert orig.calls() == [0]
    with Backends(1, delay=1.0) as slow, Backends(1) as orig, RunningLookaside(slow.addresses) as la:
        icpt = lookaside_grpc.aio.LookasideInterceptor(la.address, ROUTES)
        async with grpc.aio.insecure_channel(orig.addresses[0], interceptors=icpt.interceptors) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Greet(req(), timeout=0.3)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 0.9
        await icpt.close()
    with Backends(1) as orig:
        icpt = lookaside_grpc.aio.LookasideInterceptor(unused_address(), ROUTES, route_wait=0.3)
        async with grpc.aio.insecure_channel(orig.addresses[0], interceptors=icpt.interceptors) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            start = time.monotonic()
            assert (await stub.Greet(req(), timeout=2)).result.endswith(orig.addresses[0])
            assert time.monotonic() - start < 1.0
            assert icpt.stats().fallbacks == {"no_endpoints": 1}
        await icpt.close()


async def test_aio_intercepted_channel_shares_its_options_with_the_backends() -> None:
    from lookaside_dev.interop.server import SERVICE, InteropBackend
    from lookaside_dev.interop.v1 import messages_pb2, test_pb2_grpc
    from lookaside_dev.silent import serve_lookaside

    big = messages_pb2.SimpleRequest(response_size=5 << 20)
    opts = [("grpc.max_receive_message_length", 16 << 20)]
    with InteropBackend() as backend, InteropBackend() as original, serve_lookaside([backend.address]) as la:
        ch, icpt = lookaside_grpc.aio.intercepted_channel(
            original.address, {SERVICE: "interop.default"}, lookaside=la.address, options=opts
        )
        async with icpt:
            async with ch:
                reply = await test_pb2_grpc.TestServiceStub(ch).UnaryCall(big, timeout=10)
                assert len(reply.payload.body) == 5 << 20 and reply.server_id == backend.address
                streamed = test_pb2_grpc.TestServiceStub(ch).StreamingOutputCall(
                    messages_pb2.StreamingOutputCallRequest(
                        response_parameters=[messages_pb2.ResponseParameters(size=5 << 20)]
                    ),
                    timeout=10,
                )
                assert [len(r.payload.body) async for r in streamed] == [5 << 20]
