"""LookasideInterceptor on an existing sync channel: routing, shapes, metadata/deadlines/errors, fallbacks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

import lookaside_grpc
from examples.greet import greet_pb2_grpc
from lookaside_dev.fakes import Backends, RunningLookaside, greetings, req, unused_address

ROUTES = {"greet.GreetService": lookaside_grpc.Target("greet", "default")}


@pytest.fixture
def backends() -> Iterator[Backends]:
    with Backends(3) as b:
        yield b


@pytest.fixture
def original() -> Iterator[Backends]:
    """The backend the application's own channel points at (fallback path)."""
    with Backends(1) as b:
        yield b


@pytest.fixture
def lookaside(backends: Backends) -> Iterator[RunningLookaside]:
    with RunningLookaside(backends.addresses) as la:
        yield la


def intercepted(original: Backends, interceptor: lookaside_grpc.LookasideInterceptor) -> grpc.Channel:
    return grpc.intercept_channel(grpc.insecure_channel(original.addresses[0]), interceptor)


def test_all_shapes_are_balanced_with_one_connection_each(
    backends: Backends, original: Backends, lookaside: RunningLookaside
) -> None:
    with lookaside_grpc.LookasideInterceptor(lookaside.address, ROUTES) as icpt:
        ch = intercepted(original, icpt)
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        assert stub.Greet(req(), timeout=5).result.startswith("Hello Ada L from 127.0.0.1:")
        resp, call = stub.Greet.with_call(req(), timeout=5)
        assert call.code() is grpc.StatusCode.OK and resp.result
        fut = stub.Greet.future(req(), timeout=5)
        assert fut.result().result and fut.code() is grpc.StatusCode.OK and fut.done()
        many = stub.GreetManyTimes(req("Bo"), timeout=5)
        assert [r.result[-2:] for r in many] == ["#0", "#1", "#2"]
        assert many.code() is grpc.StatusCode.OK
        assert "b X" in stub.LongGreet(greetings("a", "b"), timeout=5).result
        assert "d X" in stub.LongGreet.future(greetings("d"), timeout=5).result().result
        out = [r.result for r in stub.GreetEveryone(greetings("e", "f"), timeout=5)]
        assert [o.split(" from")[0] for o in out] == ["Hello e X", "Hello f X"]
        assert sum(backends.calls()) == 7
        with futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _: stub.Greet(req(), timeout=5), range(293)))
        assert backends.calls() == [100, 100, 100]
        assert backends.connections() == [1, 1, 1]
        assert original.calls() == [0]
        st = icpt.stats()
        assert sum(st.picks.values()) == 300 and set(st.picks) == set(backends.addresses)
        assert not st.fallbacks


def test_metadata_compression_deadlines_and_errors_reach_the_caller(original: Backends) -> None:
    with Backends(1, echo=True) as b, RunningLookaside(b.addresses) as la:
        with lookaside_grpc.LookasideInterceptor(la.address, {"greet.GreetService": "greet.default"}) as icpt:
            stub = greet_pb2_grpc.GreetServiceStub(intercepted(original, icpt))
            resp, call = stub.Greet.with_call(
                req(),
                timeout=5,
                metadata=(("x-test", "hi"),),
                compression=grpc.Compression.Gzip,
                wait_for_ready=True,
            )
            assert resp.result.startswith("hi Hello Ada")
            assert ("x-served-by", b.addresses[0]) in tuple(call.trailing_metadata())
            with pytest.raises(grpc.RpcError) as err:
                stub.Greet(req("fail"), timeout=5)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == f"asked to fail by {b.addresses[0]}"
            fut = stub.Greet.future(req("fail"), timeout=5)
            assert fut.exception().code() is grpc.StatusCode.FAILED_PRECONDITION
    with Backends(1, delay=1.0) as slow, RunningLookaside(slow.addresses) as la:
        with lookaside_grpc.LookasideInterceptor(la.address, ROUTES) as icpt:
            stub = greet_pb2_grpc.GreetServiceStub(intercepted(original, icpt))
            stub.GreetManyTimes(req(), timeout=5)  # warm up the set
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.Greet(req(), timeout=0.3)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 0.9
    assert original.calls() == [0]


def test_unconfigured_service_goes_through_the_original_channel(
    backends: Backends, original: Backends, lookaside: RunningLookaside
) -> None:
    with lookaside_grpc.LookasideInterceptor(lookaside.address, {"other.Service": "other.default"}) as icpt:
        stub = greet_pb2_grpc.GreetServiceStub(intercepted(original, icpt))
        assert stub.Greet(req(), timeout=5).result.endswith(original.addresses[0])
        assert len(list(stub.GreetManyTimes(req(), timeout=5))) == 3
        assert original.calls() == [2] and backends.calls() == [0, 0, 0]
        assert icpt.stats().fallbacks == {"no_route": 2, "unresolved_route": 1}  # other.Service: unknown
        assert lookaside.servicer.stats()["watch"] == 0


def test_method_unknown_to_the_descriptor_pool_goes_through_the_original_channel(
    backends: Backends, lookaside: RunningLookaside
) -> None:
    served: list[bytes] = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        served.append(request)
        return request

    handler = grpc.method_handlers_generic_handler(
        "hidden.Service", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=(handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        routes = {"hidden.Service": "greet.default", **ROUTES}
        with lookaside_grpc.LookasideInterceptor(lookaside.address, routes) as icpt:
            ch = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"), icpt)
            assert ch.unary_unary("/hidden.Service/Echo")(b"raw", timeout=5) == b"raw"
            assert served == [b"raw"] and backends.calls() == [0, 0, 0]
            assert icpt.stats().fallbacks == {"unknown_method": 1, "unresolved_route": 1}
    finally:
        server.stop(None)


def test_unreachable_lookaside_falls_back_within_the_deadline(original: Backends) -> None:
    with lookaside_grpc.LookasideInterceptor(unused_address(), ROUTES, route_wait=0.3) as icpt:
        stub = greet_pb2_grpc.GreetServiceStub(intercepted(original, icpt))
        start = time.monotonic()
        assert stub.Greet(req(), timeout=2).result.endswith(original.addresses[0])
        assert time.monotonic() - start < 1.0
        assert stub.Greet(req()).result.endswith(original.addresses[0])  # no timeout: route_wait bounds it
        assert original.calls() == [2]
        assert icpt.stats().fallbacks == {"no_endpoints": 2}


def test_interceptor_and_channel_share_one_balancer(
    backends: Backends, original: Backends, lookaside: RunningLookaside
) -> None:
    with (
        lookaside_grpc.LookasideInterceptor(lookaside.address, ROUTES) as icpt,
        lookaside_grpc.channel("greet", lookaside=lookaside.address) as ch,
    ):
        greet_pb2_grpc.GreetServiceStub(intercepted(original, icpt)).Greet(req(), timeout=5)
        greet_pb2_grpc.GreetServiceStub(ch).Greet(req(), timeout=5)
        assert lookaside.servicer.stats()["watch"] == 1
        assert sum(backends.connections()) == 2
        assert sum(ch.stats().picks.values()) == 2


def test_intercepted_channel_dials_original_and_backends_with_one_set_of_options() -> None:
    """grpc does not expose a channel's options, so the interceptor takes them as ``options=``;
    ``intercepted_channel`` builds the original channel and the interceptor from the same ones: a 5 MB reply
    that needs max_receive_message_length works balanced and on the fallback path."""
    from lookaside_dev.interop.server import SERVICE, InteropBackend
    from lookaside_dev.interop.v1 import messages_pb2, test_pb2_grpc
    from lookaside_dev.silent import serve_lookaside

    big = messages_pb2.SimpleRequest(response_size=5 << 20)
    opts = [("grpc.max_receive_message_length", 16 << 20)]
    with InteropBackend() as backend, InteropBackend() as original, serve_lookaside([backend.address]) as la:
        with lookaside_grpc.intercepted_channel(
            original.address, {SERVICE: "interop.default"}, lookaside=la.address, options=opts
        ) as ch:
            reply = test_pb2_grpc.TestServiceStub(ch).UnaryCall(big, timeout=10)
            assert len(reply.payload.body) == 5 << 20 and reply.server_id == backend.address
            icpt = ch.interceptor
        with lookaside_grpc.intercepted_channel(
            original.address, {"other.Service": "interop.default"}, lookaside=la.address, options=opts
        ) as ch:  # not routed: the original channel, with the same options
            reply = test_pb2_grpc.TestServiceStub(ch).UnaryCall(big, timeout=10)
            assert len(reply.payload.body) == 5 << 20 and reply.server_id == original.address
        with lookaside_grpc.intercepted_channel(
            original.address, {SERVICE: "interop.default"}, lookaside=la.address
        ) as ch:  # without the option, balanced calls fail as a plain channel's would
            with pytest.raises(grpc.RpcError) as err:
                test_pb2_grpc.TestServiceStub(ch).UnaryCall(big, timeout=10)
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(ValueError):  # close() closed the interceptor too
        icpt._core.route(f"/{SERVICE}/UnaryCall")


def test_interceptor_takes_every_channel_option() -> None:
    """The interceptor accepts each option channel() does (tls_server_name raised TypeError before)."""
    creds = grpc.ssl_channel_credentials()
    with lookaside_grpc.LookasideInterceptor(
        unused_address(),
        ROUTES,
        credentials=creds,
        tls_server_name="greet.internal",
        lookaside_keepalive=None,
    ) as icpt:
        settings = icpt._core.settings["greet.GreetService"]
        assert dict(settings.backend_options())["grpc.ssl_target_name_override"] == "greet.internal"
    with pytest.raises(TypeError):
        lookaside_grpc.LookasideInterceptor(unused_address(), ROUTES, init_timeout=1)  # type: ignore[call-arg]


def test_strict_routes_raise_for_unknown_services() -> None:
    with pytest.raises(ValueError, match="no.Such"):
        lookaside_grpc.LookasideInterceptor(unused_address(), {"no.Such": "x.default"}, strict=True)
