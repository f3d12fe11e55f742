"""Retry budget: retries are limited to a fraction of the calls (plus a small reserve per second), so an
outage cannot double the load on the pods that are left; calls not retried for the budget are counted in
stats() and exported to Prometheus."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import prometheus_client
import pytest

import lookaside_grpc
from examples.greet import greet_pb2_grpc
from examples.greet.server import GreetServicer, serve
from lookaside_dev.backends import greet_backend_of
from lookaside_dev.fakes import RunningLookaside, req
from lookaside_grpc._budget import Budget, RetryBudget


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_budget_allows_a_fraction_of_the_calls_plus_a_reserve() -> None:
    clock = Clock()
    calls = [0]
    b = Budget(RetryBudget(ratio=0.2, min_per_second=0.5, window=10.0), lambda: calls[0], clock)
    calls[0] = 100
    granted = 0
    for _ in range(100):
        if b.withdraw():
            granted += 1
            calls[0] += 1  # a retry is a call on the pool too
    assert granted == 25  # 20 % of 100 calls + 0.5/s x 10 s
    assert b.exhausted == 75 and b.retries == 25
    # a window later the old calls and retries no longer count: 100 new calls allow 25 again
    for _ in range(20):
        clock.t += 1.0
        calls[0] += 5
        assert b.withdraw()
        calls[0] += 1
    assert b.retries == 45
    refused = sum(not b.withdraw() for _ in range(100))
    assert refused > 90


def test_budget_after_a_quiet_spell_counts_the_mean_rate_not_every_call_since() -> None:
    clock = Clock()
    calls = [0]
    b = Budget(RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0), lambda: calls[0], clock)
    calls[0] = 1000
    clock.t += 100.0  # 1000 calls over 100 s: 100 in a 10 s window, so 20 retries
    granted = 0
    for _ in range(100):
        if b.withdraw():
            granted += 1
            calls[0] += 1
    assert granted == 20


def test_retry_budget_option_is_validated() -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio=-1)
    with pytest.raises(TypeError):
        lookaside_grpc.channel("greet", lookaside="127.0.0.1:1", retry_budget=0.2)  # type: ignore[call-arg]
    assert lookaside_grpc.RetryBudget() == RetryBudget(0.2, 10.0, 10.0)


class Unavailable(GreetServicer):
    """A backend in trouble: every call fails UNAVAILABLE before any response (retryable)."""

    def Greet(self, request: object, context: grpc.ServicerContext) -> object:
        self._record(context)
        context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded")


@pytest.fixture
def outage() -> Iterator[tuple[list[str], str]]:
    """Four backends, three of them failing UNAVAILABLE on every call: (all addresses, the healthy one)."""
    servers = []
    healthy_server, _, port = serve(0, "127.0.0.1")
    servers.append(healthy_server)
    healthy = f"127.0.0.1:{port}"
    addresses = [healthy]
    for _ in range(3):
        server = grpc.server(futures.ThreadPoolExecutor(4))
        p = server.add_insecure_port("127.0.0.1:0")
        greet_pb2_grpc.add_GreetServiceServicer_to_server(Unavailable(f"127.0.0.1:{p}"), server)
        server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{p}")
    yield addresses, healthy
    for s in servers:
        s.stop(grace=None).wait(5)


def _drive(
    lookaside: str, budget: RetryBudget | None, calls: int
) -> tuple[Counter[str], lookaside_grpc.Stats]:
    with lookaside_grpc.channel("greet", lookaside=lookaside, retry_budget=budget) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        outcome: Counter[str] = Counter()
        for _ in range(calls):
            try:
                outcome[greet_backend_of(stub.Greet(req(), timeout=5).result)] += 1
            except grpc.RpcError as e:
                outcome[e.code().name] += 1
        return outcome, ch.stats()


def test_an_outage_does_not_double_the_load_on_the_pods_left(outage: tuple[list[str], str]) -> None:
    addresses, healthy = outage
    with RunningLookaside(addresses) as la:
        # no budget: (the unejected half of) the failing calls are all retried on the healthy pod
        free, free_stats = _drive(la.address, None, 300)
        budget = RetryBudget(ratio=0.2, min_per_second=0.5, window=10.0)
        capped, stats = _drive(la.address, budget, 300)
    assert free_stats.retries_over_budget == 0
    assert free["UNAVAILABLE"] <= free_stats.retries * 0.2, (free, free_stats)  # retried, mostly saved
    first_calls = sum(stats.picks.values()) - stats.retries
    assert first_calls == 300
    assert stats.retries <= 0.2 * first_calls + 5, stats  # the budget: 20 % plus 0.5/s x 10 s
    assert stats.retries_over_budget > 0, stats
    assert capped["UNAVAILABLE"] >= stats.retries_over_budget, (capped, stats)
    # the healthy pod received its own first calls plus at most the budget's retries
    to_failing = sum(v for k, v in stats.picks.items() if k != healthy)
    assert stats.picks[healthy] - (first_calls - to_failing + stats.retries) <= stats.retries


def test_over_budget_calls_are_exported_to_prometheus(outage: tuple[list[str], str]) -> None:
    addresses, _ = outage
    registry = prometheus_client.CollectorRegistry()
    lookaside_grpc.register_prometheus(registry)
    with RunningLookaside(addresses) as la:
        budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)  # one retry in 10 s
        with lookaside_grpc.channel("greet", lookaside=la.address, retry_budget=budget) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            for _ in range(60):
                try:
                    stub.Greet(req(), timeout=5)
                except grpc.RpcError:
                    pass
            st = ch.stats()
            assert st.retries == 1 and st.retries_over_budget > 0, st
            text = prometheus_client.generate_latest(registry).decode()
    assert 'lookaside_grpc_retries_over_budget_total{target="greet.default"}' in text
