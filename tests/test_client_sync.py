"""The sync lookaside channel against real Greet backends and a fake (real gRPC) lookaside."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

import lookaside_grpc
from examples.greet import greet_pb2, greet_pb2_grpc
from lookaside_dev.fakes import Backends, RunningLookaside, greetings, req, unused_address, wait_until


@pytest.fixture
def backends() -> Iterator[Backends]:
    with Backends(3) as b:
        yield b


@pytest.fixture
def lookaside(backends: Backends) -> Iterator[RunningLookaside]:
    with RunningLookaside(backends.addresses) as la:
        yield la


def make(la: RunningLookaside | str, **kwargs: object) -> lookaside_grpc.Channel:
    address = la if isinstance(la, str) else la.address
    return lookaside_grpc.channel("greet", namespace="default", lookaside=address, **kwargs)  # type: ignore[arg-type]


def test_all_call_shapes(backends: Backends, lookaside: RunningLookaside) -> None:
    with make(lookaside) as ch:
        assert isinstance(ch, grpc.Channel)
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        assert stub.Greet(req(), timeout=5).result.startswith("Hello Ada L from 127.0.0.1:")
        resp, call = stub.Greet.with_call(req(), timeout=5)
        assert call.code() is grpc.StatusCode.OK and resp.result
        assert stub.Greet.future(req(), timeout=5).result().result
        many = [r.result for r in stub.GreetManyTimes(req("Bo"), timeout=5)]
        assert len(many) == 3 and many[2].endswith("#2")
        assert stub.LongGreet(greetings("a", "b"), timeout=5).result.startswith("Hello a X, b X from")
        resp, call = stub.LongGreet.with_call(greetings("c"), timeout=5)
        assert call.code() is grpc.StatusCode.OK and "c X" in resp.result
        assert "d X" in stub.LongGreet.future(greetings("d"), timeout=5).result().result
        out = [r.result for r in stub.GreetEveryone(greetings("e", "f", "g"), timeout=5)]
        assert [o.split(" from")[0] for o in out] == ["Hello e X", "Hello f X", "Hello g X"]
        assert sum(backends.calls()) == 8


def test_metadata_trailing_metadata_and_compression() -> None:
    with Backends(1, echo=True) as b, RunningLookaside(b.addresses) as la, make(la) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        resp, call = stub.Greet.with_call(
            req(),
            timeout=5,
            metadata=(("x-test", "hi"),),
            compression=grpc.Compression.Gzip,
            wait_for_ready=True,
        )
        assert resp.result.startswith("hi Hello Ada")
        assert ("x-served-by", b.addresses[0]) in tuple(call.trailing_metadata())


def test_backend_errors_and_deadlines_reach_the_caller(lookaside: RunningLookaside) -> None:
    with make(lookaside) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Greet(req("fail"), timeout=5)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details().startswith("asked to fail by 127.0.0.1:")
        fut = stub.Greet.future(req("fail"), timeout=5)
        assert fut.exception().code() is grpc.StatusCode.FAILED_PRECONDITION
    with Backends(1, delay=1.0) as slow, RunningLookaside(slow.addresses) as la, make(la) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Greet(req(), timeout=0.2)
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 0.9


def test_channels_are_reused_and_spread_round_robin(backends: Backends, lookaside: RunningLookaside) -> None:
    with make(lookaside) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        for _ in range(300):
            stub.Greet(req(), timeout=5)
        assert backends.calls() == [100, 100, 100]
        assert backends.connections() == [1, 1, 1]
        assert lookaside.servicer.stats()["resolve"] == 0
        assert lookaside.servicer.stats()["watch"] == 1


def test_concurrent_calls_share_one_connection_per_backend(
    backends: Backends, lookaside: RunningLookaside
) -> None:
    with make(lookaside) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        with futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: stub.Greet(req(), timeout=5), range(240)))
        assert len(results) == 240
        assert backends.calls() == [80, 80, 80]
        assert backends.connections() == [1, 1, 1]
        assert all(s.in_flight == 0 for s in ch._balancer.pool.slots().values())


def test_per_call_mode_resolves_once_per_call(backends: Backends, lookaside: RunningLookaside) -> None:
    with make(lookaside, mode="per_call") as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        for _ in range(30):
            stub.Greet(req(), timeout=5)
        assert lookaside.servicer.stats()["resolve"] == 30
        assert lookaside.servicer.stats()["watch"] == 0
        assert backends.calls() == [10, 10, 10]
        assert backends.connections() == [1, 1, 1]
        first = lookaside.servicer.requests[0]
        assert (first.service, first.namespace, first.count) == ("greet", "default", 1)


def test_batched_per_call_mode(backends: Backends, lookaside: RunningLookaside) -> None:
    with make(lookaside, mode=lookaside_grpc.PerCall(batch=5), policy="random") as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        for _ in range(30):
            stub.Greet(req(), timeout=5)
        assert lookaside.servicer.stats()["resolve"] == 6
        assert lookaside.servicer.requests[0].count == 5
        assert lookaside.servicer.requests[0].router == lookaside_grpc.Random.router_type
        assert backends.calls() == [10, 10, 10]


def test_endpoint_change_moves_traffic_and_retires_channels() -> None:
    with Backends(3) as b, RunningLookaside(b.addresses[:1]) as la, make(la) as ch:
        a, bb, c = b.addresses
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        pool = ch._balancer.pool
        stub.Greet(req(), timeout=5)
        # An open stream on A keeps A's channel alive after A leaves the set.
        requests: queue.Queue[greet_pb2.GreetingRequest | None] = queue.Queue()
        stream = stub.GreetEveryone(iter(requests.get, None), timeout=10)
        requests.put(req("s1"))
        assert next(stream).result.endswith(a)
        slot_a = pool.slots()[a]
        assert slot_a.in_flight == 1

        errors: list[BaseException] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    stub.Greet(req(), timeout=5)
                except BaseException as e:  # noqa: BLE001 - collected and asserted below
                    errors.append(e)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            la.servicer.set_endpoints([a, bb])
            wait_until(lambda: b.calls()[1] > 0)
            la.servicer.set_endpoints([bb, c])
            wait_until(lambda: b.calls()[2] > 0)
            wait_until(lambda: a not in pool.addresses())
            calls_a = b.calls()[0]
            wait_until(lambda: b.calls()[2] > 20)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert not errors
        assert b.calls()[0] == calls_a  # A gets no new calls
        assert slot_a.retired and not slot_a.closed and slot_a.in_flight == 1
        requests.put(req("s2"))
        assert next(stream).result.endswith(a)  # the in-flight stream still works
        requests.put(None)
        assert list(stream) == []
        wait_until(lambda: slot_a.closed)
        assert slot_a.in_flight == 0
        assert b.connections() == [1, 1, 1]


def test_watch_reconnects_and_keeps_the_last_set(backends: Backends, lookaside: RunningLookaside) -> None:
    with make(lookaside) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        stub.Greet(req(), timeout=5)
        lookaside.servicer.break_watches()
        for _ in range(10):  # the last set keeps serving while the stream is down
            stub.Greet(req(), timeout=5)
        wait_until(lambda: lookaside.servicer.stats()["watch"] >= 2)
        wait_until(lambda: lookaside.servicer.stats()["active_watches"] == 1)
        lookaside.servicer.set_endpoints(backends.addresses[:1])
        wait_until(lambda: ch._balancer.resolver.state.version == lookaside.servicer.version)  # type: ignore[attr-defined]
        before = backends.calls()
        for _ in range(5):
            stub.Greet(req(), timeout=5)
        assert [x - y for x, y in zip(backends.calls(), before, strict=True)] == [5, 0, 0]


@pytest.mark.parametrize("mode", ["watch", "per_call"])
def test_empty_set_is_unavailable(mode: str) -> None:
    with RunningLookaside([]) as la, make(la, mode=mode) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Greet(req(), timeout=3)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "greet" in err.value.details()
        assert time.monotonic() - start < 2.5
        # streaming shapes fail lazily, as gRPC does
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GreetManyTimes(req(), timeout=3))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("mode", ["watch", "per_call"])
def test_unreachable_lookaside_fails_within_the_deadline(mode: str) -> None:
    with make(unused_address(), mode=mode) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Greet(req(), timeout=0.5)
        elapsed = time.monotonic() - start
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "greet.default" in err.value.details()
        assert elapsed < 1.5
        fut = stub.Greet.future(req(), timeout=0.3)  # returned at once, failed once its pick fails
        assert fut.exception(timeout=2).code() is grpc.StatusCode.UNAVAILABLE and fut.done()


def test_no_timeout_uses_the_init_timeout() -> None:
    with make(unused_address(), init_timeout=0.3) as ch:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            greet_pb2_grpc.GreetServiceStub(ch).Greet(req())
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("mode", ["per_call", "watch"])
@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED]
)
def test_caller_errors_from_the_lookaside_pass_through(mode: str, code: grpc.StatusCode) -> None:
    with RunningLookaside([]) as la:
        la.servicer.resolve_error = la.servicer.watch_error = (code, "service default/greet not found")
        with make(la, mode=mode) as ch:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                greet_pb2_grpc.GreetServiceStub(ch).Greet(req(), timeout=3)
            assert err.value.code() is code
            assert err.value.details() == "service default/greet not found"
            assert time.monotonic() - start < 2.5


def test_close_stops_the_watch_thread_and_pooled_channels(
    backends: Backends, lookaside: RunningLookaside
) -> None:
    ch = make(lookaside)
    greet_pb2_grpc.GreetServiceStub(ch).Greet(req(), timeout=5)
    thread = ch._balancer.resolver._thread  # type: ignore[attr-defined]
    slots = list(ch._balancer.pool.slots().values())
    assert thread.is_alive() and slots
    ch.close()
    assert not thread.is_alive()
    assert all(s.closed for s in slots)
    wait_until(lambda: lookaside.servicer.stats()["active_watches"] == 0)
    with pytest.raises(ValueError):
        greet_pb2_grpc.GreetServiceStub(ch).Greet(req(), timeout=1)


def test_subscribe_delegates_to_the_lookaside_channel(lookaside: RunningLookaside) -> None:
    seen = threading.Event()
    with make(lookaside) as ch:

        def on_state(state: grpc.ChannelConnectivity) -> None:
            seen.set()

        ch.subscribe(on_state, try_to_connect=True)
        assert seen.wait(5)
        ch.unsubscribe(on_state)
