"""Zone-aware xDS endpoints: a stock ``xds:///`` client whose bootstrap names its zone
(``node.locality.zone``) gets its zone at priority 0, spill-over weighted in when its zone is short of
endpoints (the client library's ``zone_split`` rule), the other zones at priority 1; clients without a zone
get the zone-unaware encoding. Resources checked directly, behaviour with real clients and backends."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from lookaside_dev.backends import Backend
from lookaside_dev.static_files import write_static
from lookaside_dev.xds_client import Driver
from lookaside_server import (
    BackendEndpoint,
    RunningServer,
)
from lookaside_server._xds.resources import ENDPOINTS, XdsOptions, load_assignment, placements

NAME = "greet.default"
REPO = pathlib.Path(__file__).resolve().parents[1]


def eps(*zones: str, hints: dict[int, tuple[str, ...]] | None = None) -> tuple[BackendEndpoint, ...]:
    return tuple(
        BackendEndpoint(f"10.0.0.{i + 1}", 8080, zone=z, for_zones=(hints or {}).get(i, ()))
        for i, z in enumerate(zones)
    )


def priorities(cla: endpoint_pb2.ClusterLoadAssignment) -> dict[str, tuple[int, int]]:
    """ip -> (priority, locality weight), for the one-locality-per-endpoint layout."""
    out = {}
    for lle in cla.endpoints:
        (lb,) = lle.lb_endpoints
        out[lb.endpoint.address.socket_address.address] = (lle.priority, lle.load_balancing_weight.value)
    return out


# --- resources --------------------------------------------------------------------------------------------


def test_no_zone_is_todays_encoding() -> None:
    endpoints = eps("a", "a", "a", "b", "b", "b")
    plain = load_assignment(NAME, endpoints, XdsOptions())
    assert load_assignment(NAME, endpoints, XdsOptions(), zone="") == plain
    assert {p for p, _ in priorities(plain).values()} == {0}
    # a zone the set does not have, or too few endpoints: zones are ignored, byte for byte
    assert load_assignment(NAME, endpoints, XdsOptions(), zone="c") == plain
    few = eps("a", "b", "b")
    assert load_assignment(NAME, few, XdsOptions(), zone="a") == load_assignment(NAME, few, XdsOptions())


def test_local_zone_first_then_failover() -> None:
    cla = load_assignment(NAME, eps("a", "a", "a", "b", "b", "b"), XdsOptions(), zone="a")
    got = priorities(cla)
    assert got == {
        "10.0.0.1": (0, 1),
        "10.0.0.2": (0, 1),
        "10.0.0.3": (0, 1),
        "10.0.0.4": (1, 1),
        "10.0.0.5": (1, 1),
        "10.0.0.6": (1, 1),
    }


def test_short_zone_spills_with_weights() -> None:
    # zone a: 2 of 6 endpoints, expected share 1/2: it keeps 2/3 of its calls, 1/3 spills to zone b
    endpoints = eps("a", "a", "b", "b", "b", "b")
    placed, zoned = placements(endpoints, [1] * 6, "a")
    assert zoned and {p.priority for p in placed} == {0}
    local = sum(p.weight for p in placed if p.endpoint.zone == "a")
    spill = sum(p.weight for p in placed if p.endpoint.zone == "b")
    assert local / (local + spill) == pytest.approx(2 / 3, abs=1e-5)
    # each zone-a endpoint gets 1/3 of this client's calls, each zone-b one 1/12: with a zone-b client
    # keeping all of its calls local (1/4 on each of its 4), every pod gets 1/3 of one client's calls
    per_a = placed[0].weight / (local + spill)
    per_b = placed[2].weight / (local + spill)
    assert per_a == pytest.approx(1 / 3, abs=1e-5) and per_b == pytest.approx(1 / 12, abs=1e-5)
    # a zone-b client, with more than its share, stays local; zone a is its failover
    placed_b, _ = placements(endpoints, [1] * 6, "b")
    assert {p.endpoint.zone: p.priority for p in placed_b} == {"a": 1, "b": 0}


def test_three_zones_spill_only_to_zones_with_spare() -> None:
    # a has 1 of 9 (share 1/3 expected): keeps 1/3; b (5 of 9) has endpoints to spare, c (3 of 9) has not
    endpoints = eps("a", "b", "b", "b", "b", "b", "c", "c", "c")
    placed, _ = placements(endpoints, [1] * 9, "a")
    by_zone: Counter[tuple[str, int]] = Counter()
    for p in placed:
        by_zone[p.endpoint.zone, p.priority] += p.weight
    p0 = by_zone["a", 0] + by_zone["b", 0]
    assert by_zone["a", 0] / p0 == pytest.approx(1 / 3, abs=1e-5)
    assert by_zone["c", 1] == 3 and ("c", 0) not in by_zone


def test_load_weights_kept_within_the_shares() -> None:
    endpoints = eps("a", "a", "b", "b", "b", "b")
    placed, _ = placements(endpoints, [1, 3, 1, 1, 1, 1], "a")
    w = [p.weight for p in placed]
    assert w[1] == pytest.approx(3 * w[0], rel=1e-4)  # the load weights still split the local share
    assert (w[0] + w[1]) / sum(w) == pytest.approx(2 / 3, abs=1e-5)


def test_endpointslice_hints_decide_when_every_endpoint_has_them() -> None:
    # Kubernetes' topology-aware hints: endpoint 4 (zone b) is hinted for zone a, so a gets 1-4 at priority 0
    hints = {0: ("a",), 1: ("a",), 2: ("a",), 3: ("a",), 4: ("b",), 5: ("b",)}
    cla = load_assignment(NAME, eps("a", "a", "a", "b", "b", "b", hints=hints), XdsOptions(), zone="a")
    got = priorities(cla)
    assert [got[f"10.0.0.{i}"][0] for i in range(1, 7)] == [0, 0, 0, 0, 1, 1]
    # hints on only some endpoints are ignored (as Kubernetes does): the zone rule applies
    partial = eps("a", "a", "a", "b", "b", "b", hints={3: ("a",)})
    assert [p.priority for p in placements(partial, [1] * 6, "a")[0]] == [0, 0, 0, 1, 1, 1]


def test_grouped_layout_one_locality_per_zone() -> None:
    endpoints = eps("a", "a", "b", "b", "b", "b")
    cla = load_assignment(NAME, endpoints, XdsOptions(lb_policy="wrr"), zone="a", grouped=True)
    got = [
        (lle.priority, lle.locality.zone, len(lle.lb_endpoints), lle.load_balancing_weight.value)
        for lle in cla.endpoints
    ]
    assert [(p, z, n) for p, z, n, _ in got] == [(0, "a", 2), (0, "b", 4)]
    assert got[0][3] / (got[0][3] + got[1][3]) == pytest.approx(2 / 3, abs=1e-5)
    # no zone: one locality holding every endpoint
    (only,) = load_assignment(NAME, endpoints, XdsOptions(lb_policy="wrr"), grouped=True).endpoints
    assert len(only.lb_endpoints) == 6 and only.load_balancing_weight.value == 6


# --- the server: per-zone cache, the zone cap ---------------------------------------------------------------


@pytest.fixture
def static_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "endpoints.json"


@pytest.fixture
def lookaside(
    static_file: pathlib.Path, xds_lookaside: Callable[..., RunningServer]
) -> Callable[..., RunningServer]:
    return lambda options=None: xds_lookaside(static_file, options)


def write_zones(path: pathlib.Path, backends: dict[str, str]) -> None:
    """``default/greet`` with each address in its zone."""
    entries = [
        {"ip": a.rsplit(":", 1)[0], "port": int(a.rsplit(":", 1)[1]), "zone": z} for a, z in backends.items()
    ]
    write_static(path, {"default/greet": entries})


def test_eds_per_zone_and_zone_cap(
    static_file: pathlib.Path, lookaside: Callable[..., RunningServer]
) -> None:
    write_zones(static_file, {f"10.0.0.{i}:8080": "a" if i <= 3 else "b" for i in range(1, 7)})
    srv = lookaside(XdsOptions(max_zones=1))
    servicer = srv.server.xds  # type: ignore[attr-defined]

    async def eds(
        channel: grpc.aio.Channel, node: str, zone: str
    ) -> tuple[object, dict[str, tuple[int, int]]]:
        """An ADS stream as ``node`` in ``zone``, subscribed to the EDS name: (the call, the answer)."""
        request = discovery_pb2.DiscoveryRequest(type_url=ENDPOINTS, resource_names=[NAME])
        request.node.CopyFrom(base_pb2.Node(id=node, cluster="tests", locality=base_pb2.Locality(zone=zone)))
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await call.write(request)
        response = await asyncio.wait_for(call.read(), 10)
        cla = endpoint_pb2.ClusterLoadAssignment()
        assert response.resources[0].Unpack(cla)
        return call, priorities(cla)

    async def scenario() -> dict[str, dict[str, tuple[int, int]]]:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            call_a, seen_a = await eds(channel, "na", "a")
            assert dict(servicer.cache.zones) == {"a": 1}
            call_b, seen_b = await eds(channel, "nb", "b")  # zone a holds the only slot
            call_none, seen_none = await eds(channel, "none", "")
            for call in (call_a, call_b, call_none):
                call.cancel()
            end = time.monotonic() + 10
            while servicer.cache.zones and time.monotonic() < end:
                await asyncio.sleep(0.02)
        return {"a": seen_a, "b": seen_b, "none": seen_none}

    seen = asyncio.run(scenario())
    assert {p for p, _ in seen["a"].values()} == {0, 1}
    # zone b came while zone a held the only slot: zone-unaware, counted
    assert seen["b"] == seen["none"] and {p for p, _ in seen["b"].values()} == {0}
    assert servicer.zone_refusals == 1
    assert not servicer.cache.zones  # every stream ended: no zone is held any more


# --- end to end: stock xds:/// clients in two zones against real backends -----------------------------------


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started = [Backend() for _ in range(8)]
    yield started
    for b in started:
        b.stop()


@pytest.fixture
def drivers(xds_driver: Callable[..., Driver]) -> Callable[..., Driver]:
    return lambda lookaside, zone: xds_driver(
        f"xds:///{NAME}", lookaside, zone=zone, node=f"client-{zone or 'none'}"
    )


def until_counts(
    driver: Driver, check: Callable[[Counter[str]], bool], calls: int, deadline: float = 30.0
) -> Counter[str]:
    """Batches of ``calls`` until one satisfies ``check`` (an endpoint change reaches the client within one
    EDS push); the last batch."""
    end = time.monotonic() + deadline
    while True:
        counts, failures, errors = driver.call(calls)
        assert failures == 0, errors
        if check(counts) or time.monotonic() > end:
            return counts


def test_stock_clients_stay_in_their_zone_and_spill_when_short(
    static_file: pathlib.Path,
    lookaside: Callable[..., RunningServer],
    backends: list[Backend],
    drivers: Callable[..., Driver],
) -> None:
    zone_of = {b.address: ("a" if i < 4 else "b") for i, b in enumerate(backends)}
    write_zones(static_file, zone_of)
    srv = lookaside()
    client_a = drivers(srv.address, "a")
    client_b = drivers(srv.address, "b")
    plain = drivers(srv.address, "")

    # healthy: every call of the zone-a client stays in zone a (priority 0), over all 4 zone-a pods
    counts = until_counts(client_a, lambda c: len(c) == 4, 400)
    in_a = sum(n for addr, n in counts.items() if zone_of[addr] == "a")
    print(f"\nhealthy: zone-a client {in_a}/400 calls in zone a, {dict(counts)}")
    assert in_a == 400 and len(counts) == 4
    # a client without a zone spreads over both zones (control: zone-unaware)
    counts = until_counts(plain, lambda c: len(c) == 8, 400)
    assert {zone_of[a] for a in counts} == {"a", "b"}

    # zone a loses half its pods: 2 of 6 endpoints, so it keeps 2/3 of its calls and spills 1/3 to zone b
    gone = [b.address for b in backends[2:4]]
    write_zones(static_file, {a: z for a, z in zone_of.items() if a not in gone})
    n = 1200
    counts_a = until_counts(
        client_a, lambda c: not set(c) & set(gone) and {zone_of[a] for a in c} == {"a", "b"}, n
    )
    counts_b = until_counts(client_b, lambda c: not set(c) & set(gone), n)
    kept = sum(v for a, v in counts_a.items() if zone_of[a] == "a") / n
    per_pod = counts_a + counts_b
    print(f"zone a at half: zone-a client kept {kept:.0%} local; zone-b client {dict(counts_b)}")
    print(
        "calls per pod (both clients, 2 x",
        n,
        "):",
        {f"{zone_of[a]}:{a}": per_pod[a] for a in sorted(per_pod)},
    )
    assert 0.55 < kept < 0.78  # 2/3 expected, binomial spread: weighted_target picks localities at random
    assert all(zone_of[a] == "b" for a in counts_b)  # zone b has more than its share: stays local
    even = 2 * n / 6
    # no zone-a pod overloaded: each gets about an even share of all calls (without spill-over: 1.5x even)
    for addr in backends[0].address, backends[1].address:
        assert per_pod[addr] < 1.25 * even, (addr, per_pod[addr], even)

    # zone a back to 4 pods, then all of them stop (still listed): priority 0 has no READY endpoint and
    # gRPC's priority policy fails over to priority 1, zone b; no call fails (they wait for the failover)
    write_zones(static_file, zone_of)
    until_counts(client_a, lambda c: len(c) == 4 and all(zone_of[a] == "a" for a in c), 400)
    for b in backends[:4]:
        b.stop()
    counts = until_counts(client_a, lambda c: all(zone_of[a] == "b" for a in c), 400)
    print(f"zone a down: zone-a client {dict(counts)}")
    assert all(zone_of[a] == "b" for a in counts) and len(counts) == 4


# --- mode="xds": the zone goes into the bootstrap -------------------------------------------------------

XDS_MODE_CHILD = """
import json, os, sys
import lookaside_grpc
from examples.greet import greet_pb2, greet_pb2_grpc

lookaside, zone = sys.argv[1], sys.argv[2] or None
kwargs = {} if zone is None else {"zone": zone}
channel = lookaside_grpc.channel("greet.default", lookaside=lookaside, mode="xds", **kwargs)
request = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="a", last_name="b"))
greet_pb2_grpc.GreetServiceStub(channel).Greet(request, timeout=20, wait_for_ready=True)
node = json.loads(os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"])["node"]
try:
    lookaside_grpc.channel("greet.default", lookaside=lookaside, mode="xds", zone="elsewhere")
    error = None
except ValueError as e:
    error = str(e)
print(json.dumps({"zone": node.get("locality", {}).get("zone", ""), "other_zone": error}), flush=True)
sys.stdin.read()
channel.close()
"""


@pytest.mark.parametrize(("arg", "env", "want"), [("a", "", "a"), ("", "b", "b"), ("", "", "")])
def test_xds_mode_sends_the_zone(
    static_file: pathlib.Path,
    lookaside: Callable[..., RunningServer],
    tmp_path: pathlib.Path,
    arg: str,
    env: str,
    want: str,
) -> None:
    backend = Backend()
    try:
        write_zones(static_file, {backend.address: "a"})
        srv = lookaside()
        script = tmp_path / "child.py"
        script.write_text(XDS_MODE_CHILD)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_XDS_BOOTSTRAP")}
        environ.update(PYTHONPATH=str(REPO), LOOKASIDE_ZONE=env)
        proc = subprocess.Popen(
            [sys.executable, str(script), srv.address, arg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=environ,
        )
        try:
            assert proc.stdout is not None
            out = json.loads(proc.stdout.readline() or "null")
            assert out is not None, f"child exited {proc.wait(10)}"
            assert out["zone"] == want
            # the lookaside saw it: the stream is served for that zone
            streams = srv.server.xds.describe()  # type: ignore[attr-defined]
            assert [s["zone"] for s in streams] == [want]
            # one bootstrap per process: a channel naming another zone is refused (also after a first one
            # without a zone: its bootstrap has none)
            assert out["other_zone"] and "one xDS bootstrap per process" in out["other_zone"]
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(10)
    finally:
        backend.stop()
