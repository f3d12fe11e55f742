"""Unit tests of the load-aware policies: power of two choices, peak EWMA with an injectable clock, weighted
rotation, and the server-side load board (aggregation, expiry, weights, pickers)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest

import lookaside_grpc
from lookaside_grpc import protocol
from lookaside_grpc._endpoints import Endpoint as E
from lookaside_grpc._policies import (
    PENALTY,
    Ewma,
    LeastRequest,
    PeakEwma,
    Weighted,
    resolve_policy,
)
from lookaside_grpc._pool import ChannelPool
from lookaside_grpc._weights import normalized_weights, weighted_schedule
from lookaside_server._api.load import LoadBoard, compute_weights, meaningful
from lookaside_server._core.model import BackendEndpoint, Target


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def pool_with(loads: dict[str, int]) -> ChannelPool[Any]:
    """A pool whose slots have ``loads[address]`` calls in flight."""
    pool: ChannelPool[Any] = ChannelPool(lambda a: object(), lambda c: None)
    for address, n in loads.items():
        slot = pool.get(address)
        for _ in range(n):
            assert slot.acquire()
    return pool


def test_policy_names_and_flags() -> None:
    for name, cls, router in [
        ("least_request", lookaside_grpc.LeastRequest, protocol.LEAST_REQUEST),
        ("peak_ewma", lookaside_grpc.PeakEwma, protocol.PEAK_EWMA),
        ("weighted", lookaside_grpc.Weighted, protocol.WEIGHTED),
    ]:
        p = resolve_policy(name)
        assert isinstance(p, cls) and p.router_type == router and p.name == name
    assert (protocol.LEAST_REQUEST, protocol.PEAK_EWMA, protocol.WEIGHTED) == (2, 3, 4)
    # only the policies that need latency get calls timed; round_robin/random pay nothing
    assert not resolve_policy("round_robin").needs_latency and not resolve_policy("random").needs_latency
    assert LeastRequest.needs_latency and PeakEwma.needs_latency and Weighted.needs_latency
    assert Weighted.reports_load and not PeakEwma.reports_load and not LeastRequest.reports_load


def test_p2c_picks_the_less_loaded_of_two() -> None:
    p = LeastRequest(seed=1)
    eps = [E("a", 1), E("b", 1)]
    p.bind(pool_with({"a:1": 3, "b:1": 1}))
    assert {p.pick(eps).ip for _ in range(200)} == {"b"}
    p.bind(pool_with({"a:1": 0, "b:1": 2}))
    assert {p.pick(eps).ip for _ in range(200)} == {"a"}


def test_p2c_never_picks_the_most_loaded_and_favours_the_least() -> None:
    p = LeastRequest(seed=2)
    eps = [E("a", 1), E("b", 1), E("c", 1)]
    p.bind(pool_with({"a:1": 0, "b:1": 5, "c:1": 10}))
    counts = Counter(p.pick(eps).ip for _ in range(3000))
    assert counts["c"] == 0
    assert counts["a"] > 1800  # a wins every pair it is in: 2/3 of them


def test_p2c_reads_the_pools_live_in_flight_counts() -> None:
    pool = pool_with({"a:1": 0, "b:1": 0})
    p = LeastRequest(seed=3)
    p.bind(pool)
    eps = [E("a", 1), E("b", 1)]
    slot = pool.get("a:1")
    slot.acquire()
    assert p.pick(eps).ip == "b"
    slot.release()
    pool.get("b:1").acquire()
    assert p.pick(eps).ip == "a"
    # an address without a slot yet counts as idle
    assert p.pick([E("a", 1), E("z", 9)]).ip in {"a", "z"}


def test_ewma_decay_and_peak() -> None:
    clock = Clock()
    e = Ewma(tau=10.0, clock=clock)
    assert e.value() == 0.0
    e.observe(0.1)
    assert e.value() == pytest.approx(0.1)  # first sample above 0: taken as is (peak)
    clock.t += 10.0
    assert e.value() == pytest.approx(0.1 * math.exp(-1))  # idle time decays toward 0
    e.observe(0.5)
    assert e.value() == pytest.approx(0.5)  # a peak replaces the average at once
    clock.t += 1.0
    e.observe(0.1)
    w = math.exp(-0.1)
    assert e.value() == pytest.approx(0.5 * w + 0.1 * (1 - w))  # a lower sample blends in slowly
    before = e.value()
    for _ in range(5):
        e.observe(0.1)  # no time passes: weight 0, no change
    assert e.value() == pytest.approx(before)
    clock.t += 100.0
    e.observe(0.1)
    assert e.value() == pytest.approx(0.1, rel=1e-3)  # a long time later the old peak is forgotten


def test_peak_ewma_cost_and_pick() -> None:
    clock = Clock()
    pool = pool_with({"a:1": 0, "b:1": 0})
    p = PeakEwma(tau=10.0, clock=clock, seed=4)
    p.bind(pool)
    eps = [E("a", 1), E("b", 1)]
    # never measured and idle: cost 0; with a call in flight: the penalty
    assert p.cost("a:1") == 0.0
    pool.get("a:1").acquire()
    assert p.cost("a:1") == PENALTY + 1
    pool.get("a:1").release()
    p.observe("a:1", 0.010)
    p.observe("b:1", 0.015)  # 1.5x a's: not slow, the costs decide
    assert p.latency_ms("a:1") == pytest.approx(10.0)
    assert {p.pick(eps).ip for _ in range(100)} == {"a"}
    for _ in range(20):  # a: 10 ms x 21 in flight > b: 15 ms x 1
        pool.get("a:1").acquire()
    assert p.cost("a:1") == pytest.approx(0.010 * 21)
    assert {p.pick(eps).ip for _ in range(100)} == {"b"}
    for _ in range(20):
        pool.get("a:1").release()
    # a latency spike on a takes effect at once (peak), and decays over tau
    p.observe("a:1", 0.5)
    assert {p.pick(eps).ip for _ in range(100)} == {"b"}
    clock.t += 40.0  # a: 0.5 * e^-4 = 9 ms, b: 15 ms * e^-4 = 0.3 ms
    assert p.cost("a:1") == pytest.approx(0.5 * math.exp(-4))
    assert {p.pick(eps).ip for _ in range(100)} == {"b"}
    p.retain({"b:1"})
    assert p.latency_ms("a:1") == 0.0 and p.latency_ms("b:1") > 0


@pytest.mark.parametrize("cls", [LeastRequest, PeakEwma])
def test_a_slow_candidate_gets_probes_only_and_recovers_at_its_first_fast_answer(cls: Any) -> None:
    clock = Clock()
    pool = pool_with({"a:1": 0, "b:1": 0, "s:1": 0})
    p = cls(seed=5, clock=clock, probe_interval=0.1)
    p.bind(pool)
    eps = [E("a", 1), E("b", 1), E("s", 1)]
    for _ in range(10):
        p.observe("a:1", 0.003)
        p.observe("b:1", 0.003)
        p.observe("s:1", 0.023)
    # the fast ones are busy (more in flight than s), yet s gets one probe, then nothing until the interval
    for address in ("a:1", "b:1"):
        for _ in range(4):
            pool.get(address).acquire()
    picks = Counter(p.pick(eps).ip for _ in range(3000))
    assert picks["s"] == 1 and picks["a"] + picks["b"] == 2999
    clock.t += 0.05
    assert "s" not in {p.pick(eps).ip for _ in range(300)}
    clock.t += 0.051
    slot = pool.get("s:1")
    assert slot.acquire()  # a call of this client still in flight on s: no probe even when one is due
    assert "s" not in {p.pick(eps).ip for _ in range(300)}
    slot.release()
    assert Counter(p.pick(eps).ip for _ in range(300))["s"] == 1
    p.observe("s:1", 0.024)  # the probe's answer: still slow
    assert p.latency_ms("s:1") == pytest.approx(24.0)
    clock.t += 0.101
    assert Counter(p.pick(eps).ip for _ in range(300))["s"] == 1
    p.observe("s:1", 0.003)  # fast again: the probe's answer replaces the estimate at once
    assert p.latency_ms("s:1") == pytest.approx(3.0)
    picks = Counter(p.pick(eps).ip for _ in range(3000))
    assert picks["s"] > 1500  # idle and as fast as the others: it wins every pair it is in
    p.retain({"a:1", "b:1"})
    assert not p._probe_at and not p._probing


def test_small_latency_differences_never_make_a_candidate_slow() -> None:
    clock = Clock()
    p = LeastRequest(seed=6, clock=clock)
    p.bind(pool_with({"a:1": 3, "b:1": 0}))
    p.observe("a:1", 0.0001)
    p.observe("b:1", 0.0009)  # 9x, but under a millisecond apart: in-flight counts decide
    assert {p.pick([E("a", 1), E("b", 1)]).ip for _ in range(100)} == {"b"}


def test_ewma_mean_forgets_a_spike_after_a_few_dozen_samples() -> None:
    clock = Clock()
    e = Ewma(tau=10.0, clock=clock)
    e.observe(0.003)
    e.observe(0.050)
    assert e.mean == pytest.approx(0.003 + 0.003 * 0.02)  # clipped at 2x the mean
    for _ in range(100):
        clock.t += 0.001
        e.observe(0.003)
    assert e.mean < 0.0036 and e.value() > 0.04  # the peak EWMA still holds most of the spike


def test_weighted_spread_is_proportional() -> None:
    p = Weighted(seed=5)
    eps = (E("a", 1, weight=10), E("b", 1, weight=20), E("c", 1, weight=30))
    n = 6000
    counts = Counter(p.pick(eps).ip for _ in range(n))
    for ip, share in (("a", 1 / 6), ("b", 2 / 6), ("c", 3 / 6)):
        assert abs(counts[ip] / n - share) < 0.02, counts
    # smooth: the heaviest never runs more than twice in a row
    sched = weighted_schedule([1, 2, 3])
    run = longest = 0
    for i in sched + sched:
        run = run + 1 if i == 2 else 0
        longest = max(longest, run)
    assert longest <= 2


def test_weighted_unknown_weights_count_as_equal_and_changes_rebuild() -> None:
    p = Weighted(seed=6)
    eps = (E("a", 1), E("b", 1), E("c", 1))
    assert Counter(p.pick(eps).ip for _ in range(300)) == {"a": 100, "b": 100, "c": 100}
    # 0 among known weights = the mean of the known ones
    w = normalized_weights([0, 10, 30])
    assert w[0] == pytest.approx((w[1] + w[2]) / 2, abs=1)
    # new weights for the same endpoints (a new tuple from the Watch stream) take effect
    eps2 = (E("a", 1, weight=100), E("b", 1, weight=1), E("c", 1, weight=1))
    counts = Counter(p.pick(eps2).ip for _ in range(1020))
    assert counts["a"] > 900 and counts["b"] >= 5 and counts["c"] >= 5


def test_load_board_aggregates_expires_and_weighs() -> None:
    clock = Clock()
    board = LoadBoard(clock=clock)
    t = Target("greet", "default")

    def rep(client: str, loads: list[tuple[int, int, float, int]]) -> None:
        board.report(
            t,
            client,
            1.0,
            [
                protocol.EndpointLoad(ip="10.0.0.1", port=port, outstanding=o, latency_ms=lat, calls=c)
                for port, o, lat, c in loads
            ],
        )

    rep("c1", [(1, 4, 10.0, 10), (2, 0, 2.0, 10)])
    rep("c2", [(1, 2, 30.0, 30), (2, 1, 0.0, 0)])
    view = board.loads(t)
    assert view[("10.0.0.1", 1)].outstanding == 6
    assert view[("10.0.0.1", 1)].latency_ms == pytest.approx((10 * 11 + 30 * 31) / 42)
    assert view[("10.0.0.1", 2)].outstanding == 1 and view[("10.0.0.1", 2)].latency_ms == 2.0
    w = board.weights(t)
    assert w[("10.0.0.1", 2)] == 100 and 1 <= w[("10.0.0.1", 1)] < 10
    clock.t += 2.0
    rep("c1", [(1, 0, 2.0, 10), (2, 0, 2.0, 10)])  # c2's report is older; c1 replaced its own
    clock.t += 1.5  # c2 expired (3 intervals), c1 not
    view = board.loads(t)
    assert view[("10.0.0.1", 1)].outstanding == 0 and view[("10.0.0.1", 1)].latency_ms == 2.0
    clock.t += 10.0
    assert board.loads(t) == {}


def test_weights_and_meaningful_changes() -> None:
    from lookaside_server._api.load import Load

    w = compute_weights({("a", 1): Load(0, 10.0), ("b", 1): Load(0, 20.0), ("c", 1): Load(1, 0.0)})
    assert w == {("a", 1): 100, ("b", 1): 50, ("c", 1): 33}  # c: mean latency 15 x 2
    assert not meaningful(w, {**w, ("a", 1): 95})
    assert meaningful(w, {**w, ("b", 1): 30})
    assert meaningful(w, {("a", 1): 100})


def test_load_board_pickers() -> None:
    clock = Clock()
    board = LoadBoard(clock=clock)
    t = Target("greet", "default")
    cands = [BackendEndpoint("10.0.0.1", 1), BackendEndpoint("10.0.0.1", 2)]
    board.report(
        t,
        "c",
        1.0,
        [
            protocol.EndpointLoad(ip="10.0.0.1", port=1, outstanding=50, latency_ms=40),
            protocol.EndpointLoad(ip="10.0.0.1", port=2, outstanding=0, latency_ms=5),
        ],
    )
    for router in (protocol.LEAST_REQUEST, protocol.PEAK_EWMA):
        picks = board.pick(t, router, cands, 20)
        assert {e.port for e in picks} == {2}, router
    # picks within one Resolve count as in flight: a big batch spreads
    picks = board.pick(t, protocol.LEAST_REQUEST, cands, 200)
    assert 60 <= sum(e.port == 1 for e in picks) <= 90
    picks = board.pick(t, protocol.WEIGHTED, cands, 1000)
    share = sum(e.port == 1 for e in picks) / 1000
    w = board.weights(t)
    assert share == pytest.approx(w[("10.0.0.1", 1)] / sum(w.values()), abs=0.02)


def test_load_board_caps_reports_per_peer_per_target_and_endpoints() -> None:
    from lookaside_server._api.load import (
        MAX_LOAD_REPORT_ENDPOINTS,
        MAX_LOAD_REPORTS_PER_PEER,
        MAX_LOAD_REPORTS_PER_TARGET,
        LoadLimits,
        ReportRefused,
    )

    clock = Clock()
    limits = LoadLimits(max_reports_per_peer=3, max_reports_per_target=4, max_report_endpoints=2)
    board = LoadBoard(clock=clock, limits=limits)
    t, u = Target("greet", "default"), Target("other", "default")
    loads = [protocol.EndpointLoad(ip="10.0.0.1", port=1, outstanding=1, latency_ms=5.0)]
    for i in range(3):
        board.report(t, f"c{i}", 1.0, loads, peer="p")
    with pytest.raises(ReportRefused) as e:  # per client IP, over every target
        board.report(u, "c9", 1.0, loads, peer="p")
    assert e.value.limit == MAX_LOAD_REPORTS_PER_PEER and "--max-load-reports-per-peer" in str(e.value)
    board.report(t, "c0", 1.0, loads, peer="p")  # a client's own next report replaces its previous one
    board.report(t, "d0", 1.0, loads, peer="q")
    with pytest.raises(ReportRefused) as e:
        board.report(t, "d1", 1.0, loads, peer="q2")
    assert e.value.limit == MAX_LOAD_REPORTS_PER_TARGET and "--max-load-reports-per-target" in str(e.value)
    with pytest.raises(ReportRefused) as e:
        board.report(u, "e", 1.0, loads * 3, peer="r")
    assert e.value.limit == MAX_LOAD_REPORT_ENDPOINTS and "--max-load-report-endpoints" in str(e.value)
    assert board.stored() == 4 and board.loads(t)[("10.0.0.1", 1)].outstanding == 4
    clock.t += 3.5  # every report expired: their room is free again
    board.report(u, "c9", 1.0, loads, peer="p")
    board.report(t, "d1", 1.0, loads, peer="q2")
    board.loads(t)
    assert board.stored() == 2 and board.loads(t)[("10.0.0.1", 1)].outstanding == 1
    # a huge interval counts as at most MAX_INTERVAL
    from lookaside_server._api.load import EXPIRY_INTERVALS, MAX_INTERVAL

    board.report(t, "slow", 3600.0, loads, peer="s")
    clock.t += EXPIRY_INTERVALS * MAX_INTERVAL + 0.1
    assert board.loads(t) == {} and board.stored() == 1  # (u's report is swept on its next look)


def test_load_board_incremental_sums_match_a_full_recount() -> None:
    import random

    from lookaside_server._api.load import LoadLimits

    rng = random.Random(3)
    clock = Clock()
    board = LoadBoard(clock=clock, limits=LoadLimits(max_reports_per_peer=100))
    t = Target("greet", "default")
    current = tuple(BackendEndpoint(f"10.0.0.{i}", 80) for i in range(20))
    latest: dict[str, tuple[float, list[protocol.EndpointLoad]]] = {}
    for _ in range(600):
        client = f"c{rng.randrange(15)}"
        chosen = [*rng.sample(current, rng.randrange(0, 10)), BackendEndpoint("10.9.9.9", 80)]  # one unknown
        loads = [
            protocol.EndpointLoad(
                ip=e.ip,
                port=e.port,
                outstanding=rng.randrange(5),
                latency_ms=rng.choice([0.0, rng.uniform(1, 50)]),
                calls=rng.randrange(10),
            )
            for e in chosen
        ]
        kept = board.report(t, client, 1.0, loads, peer="p", endpoints=current)
        assert kept == len(chosen) - 1  # the endpoint the target does not have is dropped
        latest[client] = (clock.t + 3.0, loads)
        clock.t += rng.choice([0.0, 0.1, 0.5])
    expected: dict[tuple[str, int], list[float]] = {}
    for expires, loads in latest.values():
        if expires <= clock.t:
            continue
        for e in loads:
            if e.ip == "10.9.9.9":
                continue
            acc = expected.setdefault((e.ip, e.port), [0, 0.0, 0.0])
            acc[0] += e.outstanding
            if e.latency_ms > 0:
                acc[1] += e.latency_ms * (e.calls + 1)
                acc[2] += e.calls + 1
    view = board.loads(t)
    assert view.keys() == expected.keys()
    for key, (out, latw, w) in expected.items():
        assert view[key].outstanding == out
        assert view[key].latency_ms == pytest.approx(latw / w if w else 0.0, abs=1e-6)
