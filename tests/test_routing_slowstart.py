"""Slow start: an endpoint joining the set ramps up to a full share over the window (Envoy's slow start),
the endpoints of the first set do not ramp, and ``slow_start=None`` gives a new endpoint its full share at
once. On real Greet servers (a 2 s window) and with an injectable clock."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import lookaside_grpc
from examples.greet import greet_pb2_grpc
from lookaside_dev.backends import Backend, greet_backend_of
from lookaside_dev.fakes import RunningLookaside, req, wait_until
from lookaside_grpc._endpoints import Endpoint as E
from lookaside_grpc._policies import RoundRobin, SlowStart


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def test_a_new_endpoint_ramps_from_min_weight_to_a_full_share() -> None:
    clock = Clock()
    p = SlowStart(RoundRobin(start=0), window=10.0, clock=clock, seed=1)
    first = [E("a", 1), E("b", 1), E("c", 1)]
    p.retain({e.address for e in first})
    assert not p.ramping  # the first set does not ramp
    eps = [*first, E("d", 1)]
    p.retain({e.address for e in eps})
    assert set(p.ramping) == {"d:1"}
    shares = []
    for _ in range(11):
        picks = Counter(p.pick(eps).ip for _ in range(4000))
        shares.append(picks["d"] / 4000)
        clock.t += 1.0
    assert shares[0] < 0.04  # 10 % of a full share (25 %)
    assert 0.09 < shares[5] < 0.16  # half way: about half a share
    assert shares[10] == 0.25  # done: round robin's exact quarter
    assert all(x <= y + 0.02 for x, y in zip(shares, shares[1:], strict=False))
    p.retain({"a:1", "b:1"})
    assert not p.ramping


def _share_per_interval(
    stub: Any, new: str, until: Callable[[], bool], interval: float, t0: float
) -> dict[int, float]:
    per: dict[int, Counter[str]] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + 30

    def work() -> None:
        while not until() and time.monotonic() < deadline:
            b = greet_backend_of(stub.Greet(req(), timeout=5).result)
            with lock:
                per.setdefault(int((time.monotonic() - t0) / interval), Counter())[b] += 1

    ts = [threading.Thread(target=work, daemon=True) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(40)
    return {k: c[new] / sum(c.values()) for k, c in sorted(per.items()) if sum(c.values()) >= 30}


def test_a_new_pod_ramps_up_over_the_window(backends: Callable[..., Backend]) -> None:
    old = [backends(), backends()]
    new = backends()
    with (
        RunningLookaside([b.address for b in old]) as la,
        lookaside_grpc.channel("greet", lookaside=la.address, slow_start=2.0) as ch,
    ):
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        for _ in range(20):
            stub.Greet(req(), timeout=5)
        la.servicer.set_endpoints([b.address for b in (*old, new)])
        wait_until(lambda: ch._balancer._slow_start.ramping, 5)  # type: ignore[union-attr]
        t0 = time.monotonic()
        shares = _share_per_interval(stub, new.address, lambda: time.monotonic() > t0 + 3.0, 0.5, t0)
    # a full share is 1/3: it ramps from about a tenth of it to all of it over the 2 s window
    assert shares[0] < 0.15, shares
    assert shares[5] > 0.28, shares
    assert shares[0] < shares[2] < shares[5], shares


def test_without_slow_start_a_new_pod_takes_its_full_share_at_once(backends: Callable[..., Backend]) -> None:
    old = [backends(), backends()]
    new = backends()
    with (
        RunningLookaside([b.address for b in old]) as la,
        lookaside_grpc.channel("greet", lookaside=la.address, slow_start=None) as ch,
    ):
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        stub.Greet(req(), timeout=5)
        la.servicer.set_endpoints([b.address for b in (*old, new)])
        wait_until(lambda: new.address in ch._balancer.resolver.state.addresses(), 5)  # type: ignore[attr-defined]
        t0 = time.monotonic()
        shares = _share_per_interval(stub, new.address, lambda: time.monotonic() > t0 + 0.5, 0.5, t0)
    assert shares[0] > 0.28, shares


def test_slow_start_is_opt_in_and_true_means_30_s() -> None:
    with lookaside_grpc.channel("greet", lookaside="127.0.0.1:1") as ch:
        assert ch.settings.slow_start is None and ch._balancer._slow_start is None
    with lookaside_grpc.channel("greet", lookaside="127.0.0.1:1", slow_start=True) as ch:
        assert ch.settings.slow_start == 30.0 and ch._balancer._slow_start is not None
    with lookaside_grpc.channel("greet", lookaside="127.0.0.1:1", slow_start=5, mode="per_call") as ch:
        assert ch._balancer._slow_start is None  # the lookaside picks
