"""Least-loaded routing end to end: client-side least_request / peak_ewma keep calls away from a slow backend,
server-assisted weights (ReportLoad -> Watch weights) move one client away from a backend another client
loads, and Resolve with the load routers (plus the error for an unknown router)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

import lookaside_grpc
import lookaside_grpc.aio
from examples.greet import greet_pb2_grpc
from lookaside_dev.backends import Backend, greet_backend_of
from lookaside_dev.fakes import Backends, RunningLookaside, req, wait_until
from lookaside_dev.server_helpers import bad_field, endpoints, read_until, serve
from lookaside_dev.static_files import write_addresses
from lookaside_grpc import _balancer
from lookaside_grpc import protocol as pb
from lookaside_server import ListenConfig, ServerConfig, StaticFileConfig, run_in_thread
from lookaside_server._api import load as _load

SLOW = 0.05  # seconds the slow backend adds per call


def run_threads(fn: Callable[[], None], threads: int, calls: int) -> None:
    """``threads`` threads each calling ``fn`` ``calls`` times (bounded), re-raising the first failure."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(calls):
                fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    ts = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors[0]


@pytest.fixture
def fast_and_slow(backends: Callable[..., Backend]) -> Iterator[tuple[list[Backend], Backend]]:
    fast = [backends(), backends()]
    slow = backends(delay=SLOW)
    yield fast, slow


@pytest.mark.parametrize("policy", ["least_request", "peak_ewma"])
def test_slow_backend_gets_a_clearly_smaller_share(
    fast_and_slow: tuple[list[Backend], Backend], policy: str
) -> None:
    fast, slow = fast_and_slow
    addrs = [b.address for b in (*fast, slow)]
    with (
        RunningLookaside(addrs) as la,
        lookaside_grpc.channel("greet", lookaside=la.address, policy=policy) as ch,
    ):
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        served: Counter[str] = Counter()
        lock = threading.Lock()

        def call() -> None:
            b = greet_backend_of(stub.Greet(req(), timeout=5).result)
            with lock:
                served[b] += 1

        run_threads(call, threads=8, calls=60)
        total = sum(served.values())
        share = served[slow.address] / total
        assert total == 480
        # an equal share would be 1/3; both policies keep the slow backend well below it
        assert share < 0.15, (policy, served)
        assert ch.stats().picks.get(slow.address, 0) == served[slow.address]


async def test_aio_peak_ewma_avoids_the_slow_backend(fast_and_slow: tuple[list[Backend], Backend]) -> None:
    fast, slow = fast_and_slow
    addrs = [b.address for b in (*fast, slow)]
    with RunningLookaside(addrs) as la:
        async with lookaside_grpc.aio.channel("greet", lookaside=la.address, policy="peak_ewma") as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)

            async def worker() -> list[str]:
                return [greet_backend_of((await stub.Greet(req(), timeout=5)).result) for _ in range(40)]

            served = Counter(b for bs in await asyncio.gather(*(worker() for _ in range(8))) for b in bs)
            assert sum(served.values()) == 320
            assert served[slow.address] / 320 < 0.15, served
            assert ch._balancer.policy.latency_ms(slow.address) >= SLOW * 1000 * 0.5  # type: ignore[attr-defined]


@pytest.fixture
def fast_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients report every 0.1 s (the server's ack asks for it too); weights may move every 0.1 s."""
    monkeypatch.setattr(_balancer, "LOAD_REPORT_INTERVAL", 0.1)
    monkeypatch.setattr(_load, "REPORT_INTERVAL", 0.1)
    monkeypatch.setattr(_load, "MIN_PUSH_INTERVAL", 0.1)


def _weights(es: pb.EndpointSet) -> dict[str, int]:
    return {f"{e.ip}:{e.port}": e.weight for e in es.endpoints}


def test_server_assisted_weights_move_a_client_away_from_a_loaded_backend(
    tmp_path: Path, backends: Callable[..., Backend], fast_reports: None
) -> None:
    fast = backends()
    loaded = backends(delay=0.2)
    path = tmp_path / "endpoints.json"
    write_addresses(path, {"default/greet": [fast.address, loaded.address]})
    server = run_in_thread(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, grace=0.1),
            source=StaticFileConfig(path, poll_interval=0.02),
        )
    )
    address = f"127.0.0.1:{server.port}"
    watch_channel = grpc.insecure_channel(address)
    a = lookaside_grpc.channel("greet", lookaside=address, policy="weighted")
    b = lookaside_grpc.channel("greet", lookaside=address, policy="weighted", options=[("x.client", "b")])
    stop = threading.Event()
    try:
        assert a._balancer is not b._balancer  # two clients (different settings: separate balancers)
        stream = pb.LookasideStub(watch_channel).Watch(
            pb.WatchRequest(service="greet", namespace="default"), timeout=20
        )
        first = next(stream)
        assert set(_weights(first).values()) == {0}  # no load reported yet
        stub_a = greet_pb2_grpc.GreetServiceStub(a)

        def load_a() -> None:  # client A keeps calls in flight on both backends; the loaded one is slow
            for _ in range(400):
                if stop.is_set():
                    return
                stub_a.Greet(req(), timeout=5)

        threads = [threading.Thread(target=load_a, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        # the lookaside pushes new weights on the Watch stream: the loaded backend's drops well below
        deadline = time.monotonic() + 10
        for es in stream:
            w = _weights(es)
            if w[loaded.address] and w[fast.address] >= 4 * w[loaded.address]:
                break
            assert time.monotonic() < deadline, f"weights did not shift: {w}"
        stream.cancel()
        # client B never called the loaded backend itself, yet its set carries the shifted weights
        state = b._balancer.resolver.state  # type: ignore[attr-defined]
        wait_until(
            lambda: (
                {e.address: e.weight for e in state.endpoints}.get(fast.address, 0)
                >= 4 * max(1, {e.address: e.weight for e in state.endpoints}.get(loaded.address, 0))
            ),
            timeout=10,
        )
        stub_b = greet_pb2_grpc.GreetServiceStub(b)
        served = Counter(greet_backend_of(stub_b.Greet(req(), timeout=5).result) for _ in range(100))
        assert served[loaded.address] <= 25, served  # equal weights would give 50
        assert a._balancer.reports_sent >= 1 and b._balancer.reports_sent >= 1  # type: ignore[attr-defined]
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        a.close()
        b.close()
        watch_channel.close()
        server.stop()


def _req(router: int, count: int = 1) -> pb.Request:
    return pb.Request(router=router, service="greet", namespace="default", count=count)  # type: ignore[arg-type]


async def test_resolve_with_load_routers(tmp_path: Path) -> None:
    async with serve(tmp_path, {"default/greet": endpoints(2)}) as s:
        # no load reported: the load routers still answer (every endpoint counts as idle / equal)
        for router in (pb.LEAST_REQUEST, pb.PEAK_EWMA, pb.WEIGHTED):
            resp = await s.stub.Resolve(_req(router, 10))
            assert len(resp.endpoints) == 10 and {e.port for e in resp.endpoints} <= {50051, 50052}
        watch = s.stub.Watch(pb.WatchRequest(service="greet", namespace="default"))
        await read_until(watch, lambda es: len(es.endpoints) == 2)
        ack = await s.stub.ReportLoad(
            pb.LoadReport(
                service="greet",
                namespace="default",
                client_id="c1",
                interval_ms=1000,
                endpoints=[
                    pb.EndpointLoad(ip="127.0.0.1", port=50051, outstanding=40, latency_ms=50.0, calls=100),
                    pb.EndpointLoad(ip="127.0.0.1", port=50052, outstanding=0, latency_ms=1.0, calls=100),
                ],
            )
        )
        assert ack.interval_ms == 1000
        for router in (pb.LEAST_REQUEST, pb.PEAK_EWMA):
            resp = await s.stub.Resolve(_req(router, 20))
            assert [e.port for e in resp.endpoints] == [50052] * 20, router
        resp = await s.stub.Resolve(_req(pb.WEIGHTED, 130))
        assert sum(e.port == 50051 for e in resp.endpoints) <= 4
        # Watch subscribers get the weights
        es = await read_until(watch, lambda es: any(e.weight for e in es.endpoints))
        w = {e.port: e.weight for e in es.endpoints}
        assert w[50052] == 100 and 1 <= w[50051] <= 2
        watch.cancel()
        # an unknown router value is still a caller error naming the field
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Resolve(_req(7))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and bad_field(err.value) == "router"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.ReportLoad(pb.LoadReport(service="greet", namespace="default"))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and bad_field(err.value) == "client_id"


def test_per_call_mode_sends_the_router_and_reports_load(fast_reports: None) -> None:
    with Backends(2) as two, RunningLookaside(two.addresses) as la:
        with lookaside_grpc.channel(
            "greet", lookaside=la.address, mode="per_call", policy="least_request"
        ) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            for _ in range(4):
                stub.Greet(req(), timeout=5)
            assert {r.router for r in la.servicer.requests if isinstance(r, pb.Request)} == {pb.LEAST_REQUEST}
            assert ch._balancer.reports_load  # type: ignore[attr-defined]
        # the fake lookaside does not implement ReportLoad: reports fail quietly, calls are unaffected
        with lookaside_grpc.channel("greet", lookaside=la.address, policy="round_robin") as ch:
            assert not ch._balancer.reports_load and ch._balancer.observe is None  # type: ignore[attr-defined]
