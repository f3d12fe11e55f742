"""Zone-aware routing: a client in zone a keeps its calls in zone a while zone a has its share of the
endpoints, spills over when zone a lost pods (so that no zone-a pod gets more than an even share), and follows
EndpointSlice ``hints.forZones`` when every endpoint has them. Real Greet servers behind a lookaside."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

import lookaside_grpc
from examples.greet import greet_pb2_grpc
from lookaside_dev.backends import Backend, greet_backend_of
from lookaside_dev.fakes import RunningLookaside, req, wait_until
from lookaside_grpc._endpoints import Endpoint as E
from lookaside_grpc._policies import RoundRobin, ZoneAware, zone_split


def eps(spec: str) -> list[E]:
    """``"aab"`` -> endpoints 10.0.0.1 (zone a), 10.0.0.2 (a), 10.0.0.3 (b)."""
    return [E(f"10.0.0.{i + 1}", 80, z) for i, z in enumerate(spec)]


def test_zone_split_rules() -> None:
    local, spill, keep = zone_split(eps("aaaabbbb"), "a")
    assert {e.zone for e in local} == {"a"} and spill == () and keep == 1.0
    local, spill, keep = zone_split(eps("aabbbb"), "a")  # a lost half its pods
    assert len(local) == 2 and {e.zone for e in spill} == {"b"} and keep == pytest.approx(2 / 6 / 0.5)
    # three zones: the spill goes to the zones with endpoints to spare
    local, spill, keep = zone_split(eps("abbbbbcc"), "a")
    assert {e.zone for e in spill} == {"b"} and keep == pytest.approx((1 / 8) / (1 / 3))
    assert zone_split(eps("aaaabbbb"), "")[2] == 1.0 and len(zone_split(eps("aaaabbbb"), "")[0]) == 8
    assert len(zone_split(eps("aabbb"), "a")[0]) == 5  # under 6 endpoints zones are ignored
    assert len(zone_split(eps("bbbbbb"), "a")[0]) == 6  # no local endpoint: all of them
    hinted = [E("10.0.0.1", 80, "a", for_zones=("a",)), E("10.0.0.2", 80, "b", for_zones=("b", "a"))]
    hinted += [E("10.0.0.3", 80, "b", for_zones=("b",))]
    assert [e.ip for e in zone_split(hinted, "a")[0]] == ["10.0.0.1", "10.0.0.2"]
    assert [e.ip for e in zone_split(hinted, "c")[0]] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_zone_aware_picks_follow_the_split() -> None:
    p = ZoneAware(RoundRobin(start=0), "a", seed=1)
    s = tuple(eps("aabbbb"))
    picks = Counter(p.pick(s).zone for _ in range(6000))
    assert picks["a"] / 6000 == pytest.approx(2 / 3, abs=0.03)


def test_zone_comes_from_the_option_or_lookaside_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKASIDE_ZONE", "zone-x")
    with lookaside_grpc.channel("greet", lookaside="127.0.0.1:1") as ch:
        assert ch.settings.zone == "zone-x" and ch._balancer._zone is not None
    with lookaside_grpc.channel("greet", lookaside="127.0.0.1:1", zone="") as ch:
        assert ch._balancer._zone is None


def _calls(ch: lookaside_grpc.Channel, n: int) -> Counter[str]:
    stub = greet_pb2_grpc.GreetServiceStub(ch)
    return Counter(greet_backend_of(stub.Greet(req(), timeout=5).result) for _ in range(n))


def test_calls_stay_in_zone_then_spill_over_without_overloading_zone_a(
    backends: Callable[..., Backend],
) -> None:
    a = [backends() for _ in range(4)]
    b = [backends() for _ in range(4)]
    spec = [("127.0.0.1", x.port, "a") for x in a] + [("127.0.0.1", x.port, "b") for x in b]
    in_a = {x.address for x in a}
    with (
        RunningLookaside(spec) as la,
        lookaside_grpc.channel("greet", lookaside=la.address, zone="a") as ca,
        lookaside_grpc.channel("greet", lookaside=la.address, zone="b") as cb,
    ):
        healthy = _calls(ca, 400)
        assert sum(n for addr, n in healthy.items() if addr in in_a) / 400 >= 0.95, healthy
        # zone a loses half its pods
        la.servicer.set_endpoints(spec[2:])
        wait_until(lambda: len(ca._balancer.resolver.state.addresses()) == 6, 5)  # type: ignore[attr-defined]
        wait_until(lambda: len(cb._balancer.resolver.state.addresses()) == 6, 5)  # type: ignore[attr-defined]
        from_a, from_b = _calls(ca, 600), _calls(cb, 600)
    kept = sum(n for addr, n in from_a.items() if addr in in_a) / 600
    assert 0.55 < kept < 0.8, from_a  # 2/3 stay, a third spills over
    assert all(addr not in in_a for addr in from_b), from_b  # zone b has endpoints to spare: all local
    load = from_a + from_b
    # two clients of equal rate, one per zone: every pod left gets about 1/6 of all calls
    assert max(load.values()) <= 1.35 * min(load.values()), load
