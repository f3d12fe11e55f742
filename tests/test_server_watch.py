"""Server Watch: initial set, changes, vanishing targets, fan-out, slow subscribers, shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from lookaside_dev.server_helpers import DEADLINE, endpoints, ports, read_until, serve, wait_until
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb
from lookaside_server import BackendEndpoint, Target

T = "default/greet"
TARGET = Target("greet", "default")
WATCH = pb.WatchRequest(service="greet", namespace="default")


async def _first(stream: grpc.aio.UnaryStreamCall) -> pb.EndpointSet:
    return await asyncio.wait_for(stream.read(), DEADLINE)


async def test_initial_set_then_changes(tmp_path: Path) -> None:
    data = {
        T: endpoints(2) + [{"ip": "127.0.0.1", "port": 60000, "ready": False}],
        "default/other": endpoints(1),
    }
    async with serve(tmp_path, data) as s:
        stream = s.stub.Watch(WATCH)
        first = await _first(stream)
        assert (first.service, first.namespace, first.version) == ("greet", "default", 1)
        assert ports(first) == [50051, 50052]  # only eligible endpoints
        write_static(s.path, {T: endpoints(3), "default/other": endpoints(1)})
        second = await read_until(stream, lambda m: m.version > 1)
        assert (second.version, ports(second)) == (2, [50051, 50052, 50053])
        # an unchanged rewrite publishes nothing; an unrelated target's change is not sent either
        write_static(s.path, {T: endpoints(3), "default/other": endpoints(2)})
        write_static(s.path, {T: endpoints(3, ready=False), "default/other": endpoints(2)})
        third = await read_until(stream, lambda m: True)
        assert (third.version, list(third.endpoints)) == (3, [])  # none eligible: an empty set
        write_static(s.path, {"default/other": endpoints(2)})
        gone = await read_until(stream, lambda m: True)
        assert (gone.version, list(gone.endpoints)) == (4, [])  # target vanished: empty set, stream open
        write_static(s.path, {T: endpoints(1)})
        back = await read_until(stream, lambda m: True)
        assert (back.version, ports(back)) == (5, [50051])
        stream.cancel()


async def test_port_filter(tmp_path: Path) -> None:
    data = {T: endpoints(2, port_name="grpc") + endpoints(2, base_port=8080, port_name="http")}
    async with serve(tmp_path, data) as s:
        http = await _first(s.stub.Watch(pb.WatchRequest(service="greet", namespace="default", port="http")))
        assert ports(http) == [8080, 8081]
        default = await _first(s.stub.Watch(WATCH))
        assert ports(default) == [50051, 50052]
        assert {e.port_name for e in default.endpoints} == {"grpc"}


async def test_many_subscribers_and_a_stuck_one(tmp_path: Path) -> None:
    async with serve(tmp_path, {T: endpoints(2)}, poll_interval=3600) as s:
        # a subscriber that never reads, on its own connection, with big updates to fill its windows
        stuck_channel = grpc.aio.insecure_channel(s.address)
        stuck = pb.LookasideStub(stuck_channel).Watch(WATCH)
        streams = [s.stub.Watch(WATCH) for _ in range(20)]
        for st in streams:
            assert ports(await _first(st)) == [50051, 50052]

        async def all_watching() -> bool:
            return s.server.status()[0].watchers == 21

        await wait_until(all_watching, what="21 watchers")
        big = tuple(
            BackendEndpoint(f"10.{i // 250}.{i % 250}.1", 8000 + j) for i in range(500) for j in range(2)
        )
        for version in range(2, 52):  # 50 changes straight into the registry, ~30 KB each
            s.server.registry.publish(TARGET, big[: 500 + version])
        final = 51
        for st in streams:
            got = await read_until(st, lambda m: m.version == final)
            assert len(got.endpoints) == 500 + final
        # the stuck one is still subscribed and held at most one pending state
        assert s.server.status()[0].watchers == 21
        for st in streams:
            st.cancel()
        stuck.cancel()
        await stuck_channel.close()

        async def only_left() -> bool:
            return s.server.status()[0].watchers == 0

        await wait_until(only_left, what="watchers to leave")


async def test_server_stop_ends_watch_streams(tmp_path: Path) -> None:
    async with serve(tmp_path, {T: endpoints(2)}) as s:
        stream = s.stub.Watch(WATCH)
        await _first(stream)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await s.server.stop(grace=5.0)
        assert loop.time() - started < 2.0  # the open stream did not hold the server for the grace period
        end = await asyncio.wait_for(stream.read(), DEADLINE)
        assert end is grpc.aio.EOF
        assert await stream.code() == grpc.StatusCode.OK
