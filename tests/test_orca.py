"""ORCA: backends report their load in each call's trailers (``lookaside_grpc.orca`` interceptors, the
``xds.data.orca.v3.OrcaLoadReport`` of cncf/xds on the wire), and the ``weighted_round_robin`` policy spreads
calls by it (gRFC A58): in proportion to the reported capacity, equally without reports, and back to equal
once a backend's reports stop for the expiration period. Real Greet servers on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pool

import lookaside_grpc
import lookaside_grpc.aio
from examples.greet import greet_pb2, greet_pb2_grpc
from examples.greet.server import GreetServicer
from lookaside_dev.attack import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    SETTINGS,
    frame,
    frames_of,
    grpc_message,
    grpc_request_headers,
    send_raw,
)
from lookaside_dev.backends import greet_backend_of
from lookaside_dev.fakes import RunningLookaside, req, wait_until
from lookaside_grpc import orca
from lookaside_grpc._wrr import EndpointWeight, WeightedRoundRobin

#: Three backends reporting the same QPS at these CPU utilizations have capacities (weights) 4 : 2 : 1.
UTILIZATIONS = (0.2, 0.4, 0.8)
SHARES = (4 / 7, 2 / 7, 1 / 7)


class CostlyGreet(GreetServicer):
    """Greet whose handler also records a per-call ORCA value; fails ``INTERNAL`` for ``first_name=boom``."""

    def Greet(self, request: greet_pb2.GreetingRequest, context: grpc.ServicerContext) -> object:
        orca.call_recorder().record_request_cost("rows", 7.0)
        if request.greeting.first_name == "boom":
            self._record(context)
            context.abort(grpc.StatusCode.INTERNAL, "boom")
        return super().Greet(request, context)


class OrcaBackends:
    """Greet servers on 127.0.0.1, each with an ORCA interceptor and its own recorder (context manager)."""

    def __init__(self, utilizations: tuple[float | None, ...], qps: float = 100.0) -> None:
        self.servers: list[grpc.Server] = []
        self.recorders: list[orca.ServerMetricRecorder] = []
        self.addresses: list[str] = []
        for util in utilizations:
            recorder = orca.ServerMetricRecorder()
            if util is not None:
                recorder.set_cpu_utilization(util)
                recorder.set_qps(qps)
            interceptors = [orca.OrcaServerInterceptor(recorder)] if util is not None else []
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=interceptors)
            port = server.add_insecure_port("127.0.0.1:0")
            greet_pb2_grpc.add_GreetServiceServicer_to_server(CostlyGreet(f"127.0.0.1:{port}"), server)
            server.start()
            self.servers.append(server)
            self.recorders.append(recorder)
            self.addresses.append(f"127.0.0.1:{port}")

    def __enter__(self) -> OrcaBackends:
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.servers:
            s.stop(grace=None).wait(5)


@pytest.fixture
def weighted() -> Iterator[tuple[OrcaBackends, RunningLookaside]]:
    with OrcaBackends(UTILIZATIONS) as b, RunningLookaside(b.addresses) as la:
        yield b, la


def fast_wrr() -> WeightedRoundRobin:
    """gRFC A58's policy with test-sized periods: no blackout, weights refreshed every 0.1 s."""
    return WeightedRoundRobin(blackout_period=0.0, weight_expiration_period=1.0, weight_update_period=0.1)


def _ep(address: str) -> lookaside_grpc.Endpoint:
    host, _, port = address.rpartition(":")
    return lookaside_grpc.Endpoint(host, int(port))


def shares(counts: Counter[str], addresses: list[str]) -> list[float]:
    total = sum(counts.values())
    return [counts[a] / total for a in addresses]


# -- the report and its trailer ----------------------------------------------------------------------------


def test_the_report_is_wire_identical_to_xds_protos_in_the_same_process() -> None:
    from xds.data.orca.v3 import orca_load_report_pb2 as upstream  # the server's xds-protos

    ours = orca.OrcaLoadReport(
        cpu_utilization=0.5,
        mem_utilization=0.25,
        rps=7,
        rps_fractional=12.5,
        eps=0.5,
        application_utilization=0.75,
        request_cost={"rows": 3.0},
        utilization={"gpu": 0.5},
        named_metrics={"queue": 4.0},
    )
    theirs = upstream.OrcaLoadReport.FromString(ours.SerializeToString())
    assert theirs.cpu_utilization == 0.5 and theirs.mem_utilization == 0.25 and theirs.rps == 7
    assert theirs.rps_fractional == 12.5 and theirs.eps == 0.5 and theirs.application_utilization == 0.75
    assert dict(theirs.request_cost) == {"rows": 3.0} and dict(theirs.utilization) == {"gpu": 0.5}
    assert dict(theirs.named_metrics) == {"queue": 4.0}
    assert orca.OrcaLoadReport.FromString(theirs.SerializeToString()) == ours

    def shape(fields: object) -> dict[str, tuple[int, int, str]]:
        return {
            f.name: (f.number, f.type, f.message_type.full_name if f.message_type else "")
            for f in fields  # type: ignore[attr-defined]
        }

    mine = shape(orca.OrcaLoadReport.DESCRIPTOR.fields)
    upstream_fields = upstream.OrcaLoadReport.DESCRIPTOR.fields
    assert mine == shape(upstream_fields) and len(mine) == 9
    # both definitions live side by side: xds-protos' in the default pool, ours in the client's own
    default = descriptor_pool.Default().FindMessageTypeByName("xds.data.orca.v3.OrcaLoadReport")
    assert default is upstream.OrcaLoadReport.DESCRIPTOR
    assert (
        orca.POOL.FindMessageTypeByName("xds.data.orca.v3.OrcaLoadReport") is orca.OrcaLoadReport.DESCRIPTOR
    )
    assert orca.POOL is not descriptor_pool.Default()
    # and the other way round, in a fresh process: xds-protos (and the server) first, then the client
    code = (
        "from xds.data.orca.v3 import orca_load_report_pb2 as up\n"
        "import lookaside_server, lookaside_grpc\n"
        "from lookaside_grpc import orca\n"
        "r = orca.OrcaLoadReport(cpu_utilization=0.5, named_metrics={'q': 1.0})\n"
        "assert up.OrcaLoadReport.FromString(r.SerializeToString()).cpu_utilization == 0.5\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_interceptor_sends_the_standard_trailer_on_the_wire_and_a_mirror_grpcio_can_read() -> None:
    with OrcaBackends((0.5,)) as b:
        # raw HTTP/2: the trailers carry endpoint-load-metrics-bin, as gRPC's own backends send it
        port = int(b.addresses[0].rsplit(":", 1)[1])
        body = req().SerializeToString()
        got = send_raw(
            ("127.0.0.1", port),
            [
                PREFACE + frame(SETTINGS, 0, 0),
                frame(HEADERS, END_HEADERS, 1, grpc_request_headers("/greet.GreetService/Greet")),
                frame(DATA, END_STREAM, 1, grpc_message(body)),
            ],
            read_for=0.5,
        )
        trailer_blocks = [p for t, f, s, p in frames_of(got) if t == HEADERS and f & END_STREAM and s == 1]
        assert trailer_blocks and orca.TRAILER.encode() in trailer_blocks[0], got
        # control: a plain grpc channel sees the mirror (grpcio keeps endpoint-load-metrics-bin to itself)
        with grpc.insecure_channel(b.addresses[0]) as ch:
            _, call = greet_pb2_grpc.GreetServiceStub(ch).Greet.with_call(req(), timeout=5)
            trailing = dict(call.trailing_metadata())
            assert orca.TRAILER not in trailing
            report = orca.load_report_of(call.trailing_metadata())
            assert report is not None and report.cpu_utilization == 0.5 and report.rps_fractional == 100.0
            assert dict(report.request_cost) == {"rows": 7.0}  # the handler's own, over the server's values
            # an aborted call still reports, and counts as an error
            with pytest.raises(grpc.RpcError) as err:
                greet_pb2_grpc.GreetServiceStub(ch).Greet(req("boom"), timeout=5)
            assert err.value.code() is grpc.StatusCode.INTERNAL
            failed = orca.load_report_of(err.value.trailing_metadata())  # type: ignore[attr-defined]
            assert failed is not None and failed.cpu_utilization == 0.5


def test_recorders_ignore_invalid_values_and_measure_rates() -> None:
    now = [100.0]
    rec = orca.ServerMetricRecorder(clock=lambda: now[0])
    rec.set_cpu_utilization(-1.0)
    rec.set_memory_utilization(float("nan"))
    assert rec.report() == orca.OrcaLoadReport()
    assert rec.serialized() == b""  # nothing to report: no trailer
    for i in range(30):
        rec.count(ok=i % 3 != 0)
    now[0] += 2.0
    report = rec.report()
    assert report.rps_fractional == 15.0 and report.eps == 5.0  # 30 calls, 10 errors over 2 s
    rec.set_qps(42.0)
    assert rec.report().rps_fractional == 42.0  # set beats measured
    call = orca.CallMetricRecorder().record_cpu_utilization(-3).record_named_metric("x", 1.5)
    assert not call.empty
    assert orca.call_recorder().empty  # outside a handler: a recorder nothing reads


class AioGreet(greet_pb2_grpc.GreetServiceServicer):
    def __init__(self, name: str) -> None:
        self.name = name

    async def Greet(self, request: greet_pb2.GreetingRequest, context: grpc.aio.ServicerContext) -> object:  # type: ignore[override]
        orca.call_recorder().record_named_metric("queue", 3.0)
        if request.greeting.first_name == "boom":
            await context.abort(grpc.StatusCode.INTERNAL, "boom")
        return greet_pb2.GreetingResponse(result=f"Hello from {self.name}")

    async def GreetManyTimes(  # type: ignore[override]
        self, request: greet_pb2.GreetingRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[greet_pb2.GreetingResponse]:
        for i in range(3):
            orca.call_recorder().record_named_metric("sent", float(i + 1))
            yield greet_pb2.GreetingResponse(result=f"#{i} from {self.name}")


async def test_the_aio_interceptor_reports_on_unary_streaming_and_aborted_calls() -> None:
    recorder = orca.ServerMetricRecorder()
    recorder.set_application_utilization(0.3)
    server = grpc.aio.server(interceptors=[orca.AioOrcaServerInterceptor(recorder)])
    port = server.add_insecure_port("127.0.0.1:0")
    greet_pb2_grpc.add_GreetServiceServicer_to_server(AioGreet(f"127.0.0.1:{port}"), server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            call = stub.Greet(req(), timeout=5)
            await call
            report = orca.load_report_of(tuple(await call.trailing_metadata()))
            assert report is not None and report.application_utilization == 0.3
            assert dict(report.named_metrics) == {"queue": 3.0}
            stream = stub.GreetManyTimes(req(), timeout=5)
            assert len([r async for r in stream]) == 3
            streamed = orca.load_report_of(tuple(await stream.trailing_metadata()))
            assert streamed is not None and dict(streamed.named_metrics) == {"sent": 3.0}
            failing = stub.Greet(req("boom"), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await failing
            assert err.value.code() is grpc.StatusCode.INTERNAL
            aborted = orca.load_report_of(tuple(err.value.trailing_metadata()))
            assert aborted is not None and aborted.application_utilization == 0.3
    finally:
        await server.stop(None)


# -- the weights (gRFC A58) ---------------------------------------------------------------------------------


def test_weight_formula_blackout_and_expiration() -> None:
    w = EndpointWeight()
    w.update(qps=100.0, eps=10.0, utilization=0.5, penalty=1.0, now=0.0)
    assert w.weight == pytest.approx(100.0 / (0.5 + 0.1))
    assert w.get(now=5.0, blackout=10.0, expiration=180.0) == 0.0  # still in its blackout
    assert w.get(now=10.0, blackout=10.0, expiration=180.0) == pytest.approx(166.67, rel=1e-3)
    assert w.get(now=180.0, blackout=10.0, expiration=180.0) == 0.0  # expired: blackout applies again
    w.update(qps=100.0, eps=0.0, utilization=0.25, penalty=1.0, now=181.0)
    assert w.get(now=185.0, blackout=10.0, expiration=180.0) == 0.0
    assert w.get(now=191.0, blackout=10.0, expiration=180.0) == 400.0
    w.update(qps=0.0, eps=0.0, utilization=0.5, penalty=1.0, now=192.0)  # no qps: ignored
    assert w.weight == 400.0 and w.last_updated == 181.0
    with pytest.raises(ValueError):
        WeightedRoundRobin(error_utilization_penalty=-1.0)
    assert lookaside_grpc.WeightedRoundRobin is WeightedRoundRobin


def _spread(ch: grpc.Channel, calls: int) -> Counter[str]:
    stub = greet_pb2_grpc.GreetServiceStub(ch)
    return Counter(greet_backend_of(stub.Greet(req(), timeout=5).result) for _ in range(calls))


def _warm(ch: grpc.Channel, policy: WeightedRoundRobin, addresses: list[str]) -> None:
    """Calls until every backend's reported weight counts (bounded)."""
    stub = greet_pb2_grpc.GreetServiceStub(ch)
    eps = [_ep(a) for a in addresses]
    for _ in range(600):
        stub.Greet(req(), timeout=5)
        if all(policy.weights(eps)):
            return
    raise AssertionError(f"weights never known: {policy.weights(eps)}")


@pytest.mark.parametrize("flavour", ["factory", "interceptor"])
def test_wrr_spreads_calls_in_proportion_to_reported_capacity(
    weighted: tuple[OrcaBackends, RunningLookaside], flavour: str
) -> None:
    b, la = weighted
    policy = fast_wrr()
    if flavour == "factory":
        ch: grpc.Channel = lookaside_grpc.channel("greet", lookaside=la.address, policy=policy)
    else:
        ch = lookaside_grpc.intercepted_channel(
            b.addresses[0], {"greet.GreetService": "greet.default"}, lookaside=la.address, policy=policy
        )
    with ch:
        _warm(ch, policy, b.addresses)
        got = shares(_spread(ch, 1400), b.addresses)
    print(
        "weighted_round_robin shares", [round(s, 3) for s in got], "expected", [round(s, 3) for s in SHARES]
    )
    for share, expected in zip(got, SHARES, strict=True):
        assert share == pytest.approx(expected, abs=0.04), got


async def test_aio_wrr_spreads_calls_in_proportion_to_reported_capacity(
    weighted: tuple[OrcaBackends, RunningLookaside],
) -> None:
    b, la = weighted
    policy = fast_wrr()
    eps = [_ep(a) for a in b.addresses]
    async with lookaside_grpc.aio.channel("greet", lookaside=la.address, policy=policy) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        for _ in range(600):
            await stub.Greet(req(), timeout=5)
            if all(policy.weights(eps)):
                break
        assert all(policy.weights(eps)), policy.weights(eps)
        counts: Counter[str] = Counter()
        for _ in range(1400):
            counts[greet_backend_of((await stub.Greet(req(), timeout=5)).result)] += 1
    got = shares(counts, b.addresses)
    for share, expected in zip(got, SHARES, strict=True):
        assert share == pytest.approx(expected, abs=0.04), got


def test_without_reports_every_backend_weighs_the_same() -> None:
    with OrcaBackends((None, None, None)) as b, RunningLookaside(b.addresses) as la:
        with lookaside_grpc.channel("greet", lookaside=la.address, policy=fast_wrr()) as ch:
            counts = _spread(ch, 300)
    assert sorted(counts.values()) == [100, 100, 100], counts  # round robin, exactly


def test_a_backend_whose_reports_stop_has_its_weight_expire() -> None:
    with OrcaBackends((0.2, 0.2, 0.8)) as b, RunningLookaside(b.addresses) as la:
        policy = fast_wrr()
        eps = [_ep(a) for a in b.addresses]
        with lookaside_grpc.channel("greet", lookaside=la.address, policy=policy) as ch:
            _warm(ch, policy, b.addresses)
            before = shares(_spread(ch, 900), b.addresses)
            assert before[2] == pytest.approx(1 / 9, abs=0.04), before  # weights 500 : 500 : 125
            b.recorders[2].clear()  # the third backend stops reporting
            b.recorders[2].measure_rates = False
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            wait_until(lambda: stub.Greet(req(), timeout=5) is not None and policy.weights(eps)[2] == 0.0)
            after = shares(_spread(ch, 900), b.addresses)
    print("shares before / after the third backend's reports stopped:", before, after)
    for share in after:  # its weight expired: it counts with the mean of the others', as they do
        assert share == pytest.approx(1 / 3, abs=0.04), after


def test_the_policy_gets_trailers_only_when_it_asks() -> None:
    with OrcaBackends((0.5, 0.5)) as b, RunningLookaside(b.addresses) as la:
        seen: list[object] = []

        class Spy(lookaside_grpc.RoundRobin):
            wants_trailers = True

            def call_done(
                self, address: str, seconds: float, code: grpc.StatusCode, trailing: object
            ) -> None:
                seen.append((address, code, orca.load_report_of(trailing)))  # type: ignore[arg-type]

        with lookaside_grpc.channel("greet", lookaside=la.address, policy=Spy()) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            stub.Greet(req(), timeout=5)
            with pytest.raises(grpc.RpcError):
                stub.Greet(req("boom"), timeout=5)
            list(stub.GreetManyTimes(req(), timeout=5))
            stub.Greet.future(req(), timeout=5).result()
        assert [code for _, code, _ in seen] == [
            grpc.StatusCode.OK,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.OK,
            grpc.StatusCode.OK,
        ]
        assert all(r is not None and r.cpu_utilization == 0.5 for _, _, r in seen), seen  # type: ignore[attr-defined]
        assert {a for a, _, _ in seen} == set(b.addresses)


def test_the_trailer_hook_is_found_through_slow_start_and_zone_wrappers() -> None:
    from lookaside_grpc._calls._engine import trailer_hook
    from lookaside_grpc._policies import resolve_policy, with_slow_start, with_zone

    wrr = WeightedRoundRobin()
    assert trailer_hook(with_zone(with_slow_start(wrr, 30.0), "a")) == wrr.call_done
    assert trailer_hook(resolve_policy("round_robin")) is None  # the others fetch no trailers
    assert isinstance(resolve_policy("weighted_round_robin"), WeightedRoundRobin)
