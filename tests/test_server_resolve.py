"""Server Resolve: round robin (exact, shared, never reset), random, count, port selection, fields."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc

from lookaside_dev.server_helpers import endpoints, ports, read_until, serve
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb

T = "default/greet"


def rr(count: int = 0, port: str = "") -> pb.Request:
    return pb.Request(router=pb.ROUNDROBIN, service="greet", namespace="default", port=port, count=count)


async def test_round_robin_exact_share(tmp_path: Path) -> None:
    async with serve(tmp_path, {T: endpoints(4)}) as s:
        got = Counter()
        for _ in range(100):
            resp = await s.stub.Resolve(rr())
            got[resp.port] += 1
            assert resp.address == "127.0.0.1"
            assert len(resp.endpoints) == 1 and resp.endpoints[0].port == resp.port
            assert resp.version == 1
        assert got == {50051: 25, 50052: 25, 50053: 25, 50054: 25}


async def test_round_robin_shared_across_channels(tmp_path: Path) -> None:
    async with serve(tmp_path, {T: endpoints(3)}) as s:
        channels = [grpc.aio.insecure_channel(s.address) for _ in range(5)]
        try:
            stubs = [pb.LookasideStub(c) for c in channels]
            order = [(await stubs[i % 5].Resolve(rr())).port for i in range(30)]
        finally:
            for c in channels:
                await c.close()
        # one rotation for everybody: consecutive calls from different clients continue the same cycle
        assert order == [50051, 50052, 50053] * 10


async def test_count_returns_consecutive_picks(tmp_path: Path) -> None:
    async with serve(tmp_path, {T: endpoints(3)}) as s:
        first = await s.stub.Resolve(rr(count=5))
        assert ports(first) == [50051, 50052, 50053, 50051, 50052]
        assert (first.address, first.port) == ("127.0.0.1", 50051)
        second = await s.stub.Resolve(rr(count=2))
        assert ports(second) == [50053, 50051]  # the rotation advanced by 5
        big = await s.stub.Resolve(rr(count=1000))
        assert Counter(ports(big)) == {50051: 333, 50052: 334, 50053: 333}  # starts at position 7
        assert ports(big)[:3] == [50052, 50053, 50051]


async def test_round_robin_not_reset_by_endpoint_change(tmp_path: Path) -> None:
    async with serve(tmp_path, {T: endpoints(3)}) as s:
        before = [(await s.stub.Resolve(rr())).port for _ in range(5)]
        assert before == [50051, 50052, 50053, 50051, 50052]  # counter is now 5
        watch = s.stub.Watch(pb.WatchRequest(service="greet", namespace="default"))
        write_static(s.path, {T: endpoints(4)})
        changed = await read_until(watch, lambda m: len(m.endpoints) == 4)
        assert changed.version == 2
        watch.cancel()
        after = [(await s.stub.Resolve(rr())).port for _ in range(8)]
        # continuing: positions 5..12 over 4 backends start at index 1; a reset would start at 50051
        assert after == [50052, 50053, 50054, 50051] * 2
        resp = await s.stub.Resolve(rr())
        assert resp.version == 2


async def test_random_roughly_uniform(tmp_path: Path) -> None:
    async with serve(tmp_path, {T: endpoints(4)}) as s:
        got: Counter[int] = Counter()
        for _ in range(4):
            resp = await s.stub.Resolve(pb.Request(service="greet", namespace="default", count=1000))
            got.update(ports(resp))
        assert set(got) == {50051, 50052, 50053, 50054}
        expected = 1000
        chi2 = sum((got[p] - expected) ** 2 / expected for p in got)
        # chi-square with 3 degrees of freedom: P(chi2 > 30) is about 1.4e-6 for a uniform picker
        assert chi2 < 30, got
        # and it is not a rotation in disguise
        resp = await s.stub.Resolve(pb.Request(service="greet", namespace="default", count=40))
        assert ports(resp) != [50051, 50052, 50053, 50054] * 10


async def test_port_selection(tmp_path: Path) -> None:
    data = {
        T: [
            {"ip": "10.0.0.1", "port": 8080, "port_name": "http", "zone": "z1", "for_zones": ["z1", "z2"]},
            {"ip": "10.0.0.1", "port": 50051, "port_name": "grpc", "zone": "z1"},
            {"ip": "10.0.0.2", "port": 8080, "port_name": "http", "zone": "z2"},
            {"ip": "10.0.0.2", "port": 50051, "port_name": "grpc", "zone": "z2"},
        ]
    }
    async with serve(tmp_path, data) as s:
        default = await s.stub.Resolve(rr(count=2))
        assert [(e.ip, e.port, e.port_name) for e in default.endpoints] == [
            ("10.0.0.1", 8080, "http"),
            ("10.0.0.2", 8080, "http"),
        ]
        assert default.endpoints[0].zone == "z1" and list(default.endpoints[0].for_zones) == ["z1", "z2"]
        by_name = await s.stub.Resolve(rr(count=2, port="grpc"))
        assert [(e.ip, e.port) for e in by_name.endpoints] == [("10.0.0.1", 50051), ("10.0.0.2", 50051)]
        by_number = await s.stub.Resolve(rr(count=1, port="50051"))
        # "50051" and "grpc" are the same port and share one rotation
        assert (by_number.address, by_number.port) == ("10.0.0.1", 50051)
        http_number = await s.stub.Resolve(rr(count=1, port="8080"))
        assert http_number.address == "10.0.0.1"  # 2 picks of "" (the same http rotation) were taken before


async def test_ipv6_and_unnamed_ports(tmp_path: Path) -> None:
    # unnamed ports are one port (as in a single-port Service): "" rotates over all of them
    data = {
        T: [{"ip": "fd00::1", "port": 9000}, {"ip": "fd00::2", "port": 9000}, {"ip": "fd00::1", "port": 9001}]
    }
    async with serve(tmp_path, data) as s:
        resp = await s.stub.Resolve(rr(count=4))
        assert [(e.ip, e.port) for e in resp.endpoints] == [
            ("fd00::1", 9000),
            ("fd00::2", 9000),
            ("fd00::1", 9001),
            ("fd00::1", 9000),
        ]
        resp = await s.stub.Resolve(rr(port="9001", count=2))
        assert [(e.ip, e.port) for e in resp.endpoints] == [("fd00::1", 9001)] * 2
