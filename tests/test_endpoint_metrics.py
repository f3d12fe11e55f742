"""Per-endpoint call metrics: calls, failures by status code and a latency histogram per backend address, in
``stats()`` and in the Prometheus export, for the sync and aio factories and interceptors. Three real Greet
backends on 127.0.0.1, one of which fails every call with INTERNAL (not retried: it reaches the caller, as
through a plain channel)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import grpc.aio
import prometheus_client
import pytest

import lookaside_grpc
import lookaside_grpc.aio
from examples.greet import greet_pb2_grpc
from examples.greet.server import GreetServicer
from lookaside_dev.fakes import RunningLookaside, req
from lookaside_grpc._stats import LATENCY_BUCKETS, EndpointMetrics, Histogram, Stats

ROUTES = {"greet.GreetService": "greet.default"}
CALLS = 30  # round robin over three backends: 10 each


class Broken(GreetServicer):
    """A backend whose every call fails INTERNAL (the application's error: never retried)."""

    def Greet(self, request: object, context: grpc.ServicerContext) -> object:
        self._record(context)
        context.abort(grpc.StatusCode.INTERNAL, "broken")


@pytest.fixture
def backends() -> Iterator[tuple[list[str], str]]:
    """(all three addresses, the broken one)."""
    servers, addresses = [], []
    for broken in (False, False, True):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        port = server.add_insecure_port("127.0.0.1:0")
        address = f"127.0.0.1:{port}"
        servicer = Broken(address) if broken else GreetServicer(address)
        greet_pb2_grpc.add_GreetServiceServicer_to_server(servicer, server)
        server.start()
        servers.append(server)
        addresses.append(address)
    yield addresses, addresses[2]
    for s in servers:
        s.stop(grace=None).wait(5)


@pytest.fixture
def lookaside(backends: tuple[list[str], str]) -> Iterator[RunningLookaside]:
    with RunningLookaside(backends[0]) as la:
        yield la


@pytest.fixture
def registry() -> prometheus_client.CollectorRegistry:
    reg = prometheus_client.CollectorRegistry()
    lookaside_grpc.register_prometheus(reg)
    return reg


def sample(reg: prometheus_client.CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in reg.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def control_code(address: str) -> grpc.StatusCode:
    """Conformance by control: what a plain grpc channel to ``address`` gets from one Greet."""
    with grpc.insecure_channel(address) as ch:
        try:
            greet_pb2_grpc.GreetServiceStub(ch).Greet(req(), timeout=5)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def check(st: Stats, reg: prometheus_client.CollectorRegistry, addresses: list[str], broken: str) -> None:
    """10 calls ended per backend, the broken one's 10 failed INTERNAL, each in the histogram; the same in
    Prometheus."""
    for a in addresses:
        assert st.calls[a] == CALLS // 3, st
        h = st.latency[a]
        assert h.count == CALLS // 3 and h.sum > 0 and h.bounds == LATENCY_BUCKETS, h
        assert h.cumulative()[-1] == (float("inf"), CALLS // 3)
        assert sample(reg, "lookaside_grpc_endpoint_calls_total", endpoint=a) == CALLS // 3
        assert sample(reg, "lookaside_grpc_endpoint_latency_seconds_count", endpoint=a) == CALLS // 3
        assert (
            sample(reg, "lookaside_grpc_endpoint_latency_seconds_bucket", endpoint=a, le="+Inf") == CALLS // 3
        )
        assert sample(reg, "lookaside_grpc_endpoint_latency_seconds_sum", endpoint=a) > 0
    assert st.failures == {broken: {"INTERNAL": CALLS // 3}}, st.failures
    assert sample(reg, "lookaside_grpc_endpoint_failures_total", endpoint=broken, grpc_code="Internal") == 10
    healthy = [a for a in addresses if a != broken]
    assert all(sample(reg, "lookaside_grpc_endpoint_failures_total", endpoint=a) == 0 for a in healthy)


def drive(ch: grpc.Channel) -> list[grpc.StatusCode]:
    stub = greet_pb2_grpc.GreetServiceStub(ch)
    codes = []
    for _ in range(CALLS):
        try:
            stub.Greet(req(), timeout=5)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
    return codes


def test_sync_factory_counts_calls_failures_and_latency_per_endpoint(
    backends: tuple[list[str], str],
    lookaside: RunningLookaside,
    registry: prometheus_client.CollectorRegistry,
) -> None:
    addresses, broken = backends
    with lookaside_grpc.channel("greet", lookaside=lookaside.address) as ch:
        codes = drive(ch)
        assert codes.count(control_code(broken)) == CALLS // 3  # the plain channel's outcome, as often
        check(ch.stats(), registry, addresses, broken)


def test_sync_interceptor_counts_calls_failures_and_latency_per_endpoint(
    backends: tuple[list[str], str],
    lookaside: RunningLookaside,
    registry: prometheus_client.CollectorRegistry,
) -> None:
    addresses, broken = backends
    with lookaside_grpc.LookasideInterceptor(lookaside.address, ROUTES) as icpt:
        with grpc.intercept_channel(grpc.insecure_channel(addresses[0]), icpt) as ch:
            codes = drive(ch)
        assert codes.count(grpc.StatusCode.INTERNAL) == CALLS // 3
        check(icpt.stats(), registry, addresses, broken)


def test_streams_are_counted_when_they_end(
    backends: tuple[list[str], str], lookaside: RunningLookaside
) -> None:
    addresses, _ = backends
    with lookaside_grpc.channel("greet", lookaside=lookaside.address) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        for _ in range(3):
            assert len(list(stub.GreetManyTimes(req(), timeout=5))) == 3
        stream = stub.GreetManyTimes(req(), timeout=5)
        stream.cancel()  # ends it (CANCELLED, or OK if it was over already)
        stub.Greet.future(req(), timeout=5).exception(timeout=5)
        st = ch.stats()
    assert sum(st.calls.values()) == 5, st  # 3 whole streams, the cancelled one and the future
    assert sum(h.count for h in st.latency.values()) == 5
    codes = {c for by_code in st.failures.values() for c in by_code}
    assert codes <= {"CANCELLED", "INTERNAL"}, st.failures


async def drive_aio(ch: grpc.aio.Channel) -> list[grpc.StatusCode]:
    stub = greet_pb2_grpc.GreetServiceStub(ch)
    codes = []
    for _ in range(CALLS):
        try:
            await stub.Greet(req(), timeout=5)
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as e:
            codes.append(e.code())
    return codes


async def test_aio_factory_counts_calls_failures_and_latency_per_endpoint(
    backends: tuple[list[str], str],
    lookaside: RunningLookaside,
    registry: prometheus_client.CollectorRegistry,
) -> None:
    addresses, broken = backends
    async with lookaside_grpc.aio.channel("greet", lookaside=lookaside.address) as ch:
        codes = await drive_aio(ch)
        assert codes.count(grpc.StatusCode.INTERNAL) == CALLS // 3
        check(ch.stats(), registry, addresses, broken)


async def test_aio_interceptor_counts_calls_failures_and_latency_per_endpoint(
    backends: tuple[list[str], str],
    lookaside: RunningLookaside,
    registry: prometheus_client.CollectorRegistry,
) -> None:
    addresses, broken = backends
    async with lookaside_grpc.aio.LookasideInterceptor(lookaside.address, ROUTES) as icpt:
        async with grpc.aio.insecure_channel(addresses[0], interceptors=icpt.interceptors) as ch:
            codes = await drive_aio(ch)
        assert codes.count(grpc.StatusCode.INTERNAL) == CALLS // 3
        check(icpt.stats(), registry, addresses, broken)


def test_histogram_buckets_are_prometheus_style_and_stats_merge() -> None:
    m = EndpointMetrics()
    for seconds in (0.0001, 0.00025, 0.0003, 0.2, 99.0):
        m.ended(seconds, grpc.StatusCode.OK)
    m.ended(0.004, grpc.StatusCode.UNAVAILABLE)
    h = m.histogram()
    cum = dict(h.cumulative())
    assert cum[0.00025] == 2  # le: 0.25 ms itself is in the 0.25 ms bucket
    assert (
        cum[0.0005] == 3 and cum[0.005] == 4 and cum[0.25] == 5 and cum[10.0] == 5 and cum[float("inf")] == 6
    )
    assert m.calls == 6 and m.failures() == {"UNAVAILABLE": 1}
    assert h.sum == pytest.approx(99.2047)
    a = Stats(calls={"x": 1}, failures={"x": {"INTERNAL": 1}}, latency={"x": h})
    a.merge(
        Stats(calls={"x": 2, "y": 1}, failures={"x": {"INTERNAL": 2}}, latency={"x": h, "y": Histogram()})
    )
    assert a.calls == {"x": 3, "y": 1} and a.failures == {"x": {"INTERNAL": 3}}
    assert a.latency["x"].count == 12 and a.latency["y"].count == 0
