"""Limits: Watch/xDS streams overall and per peer, message size, targets, concurrent RPCs, keepalive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from lookaside_dev.server_helpers import endpoints, wait_until
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb
from lookaside_server import ListenConfig, LookasideServer, ServerConfig, StaticFileConfig
from lookaside_server._security.limits import Limits, StreamSlots, peer_ip

DATA = {
    "default/greet": endpoints(2),
    "default/echo": endpoints(1, 50061),
    "default/third": endpoints(1, 50071),
}
WATCH = pb.WatchRequest(service="greet", namespace="default")
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


@asynccontextmanager
async def served(
    tmp_path: Path, max_targets: int | None = None, **config: Any
) -> AsyncIterator[tuple[LookasideServer, grpc.aio.Channel]]:
    path = tmp_path / "endpoints.json"
    write_static(path, DATA)
    server = LookasideServer(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5),
            source=StaticFileConfig(str(path), max_targets=max_targets),
            **config,
        )
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, channel
    finally:
        await channel.close()
        await server.stop(0.5)


def limit_hits(server: LookasideServer, limit: str) -> float:
    value = server.metrics.registry.get_sample_value("lookaside_limit_hits_total", {"limit": limit})
    return value or 0.0


async def open_watch(stub: pb.LookasideStub) -> Any:
    call = stub.Watch(WATCH, timeout=30)
    first = await asyncio.wait_for(call.read(), 10)
    assert first is not grpc.aio.EOF and len(first.endpoints) == 2
    return call


async def refused(call: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(call.read(), 10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return e.value.details() or ""


async def test_watch_limit_overall_and_a_freed_slot_works_again(tmp_path: Path) -> None:
    async with served(tmp_path, limits=Limits(max_watches=2)) as (server, channel):
        stub = pb.LookasideStub(channel)
        first, _second = await open_watch(stub), await open_watch(stub)
        assert server.slots.total == 2
        msg = await refused(stub.Watch(WATCH, timeout=10))
        assert "--max-watches" in msg and "2" in msg
        # Resolve is not a stream: unaffected
        assert (await stub.Resolve(pb.Request(service="greet", namespace="default"), timeout=5)).port
        first.cancel()

        async def freed() -> bool:
            return server.slots.total == 1

        await wait_until(freed, what="the cancelled Watch to give its slot back")
        third = await open_watch(stub)
        third.cancel()
        assert limit_hits(server, "max_watches") == 1
        assert server.metrics.registry.get_sample_value("lookaside_streams", {"kind": "watch"}) in (1, 2)


async def test_watch_limit_per_peer_counts_xds_streams_too(tmp_path: Path) -> None:
    async with served(tmp_path, limits=Limits(max_watches_per_peer=1)) as (server, channel):
        stub = pb.LookasideStub(channel)
        watch = await open_watch(stub)
        msg = await refused(stub.Watch(WATCH, timeout=10))
        assert "--max-watches-per-peer" in msg and "127.0.0.1" in msg

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            yield discovery_pb2.DiscoveryRequest(type_url=LISTENER, resource_names=["greet.default"])
            await asyncio.Event().wait()

        ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(requests())
        assert "--max-watches-per-peer" in await refused(ads)
        assert limit_hits(server, "max_watches_per_peer") == 2
        watch.cancel()

        async def freed() -> bool:
            return server.slots.total == 0 and server.slots.peers() == 0

        await wait_until(freed, what="the slot to be released")
        (await open_watch(stub)).cancel()


def test_stream_slots_per_peer_and_overall() -> None:
    slots = StreamSlots(max_total=3, max_per_peer=2)
    assert slots.acquire("10.0.0.1", "watch") is None
    assert slots.acquire("10.0.0.1", "xds") is None
    assert slots.acquire("10.0.0.1", "watch")[0] == "max_watches_per_peer"  # type: ignore[index]
    assert slots.acquire("10.0.0.2", "watch") is None  # another peer still gets one
    assert slots.acquire("10.0.0.3", "watch")[0] == "max_watches"  # type: ignore[index]
    assert (slots.total, slots.by_kind["watch"], slots.by_kind["xds"], slots.peers()) == (3, 2, 1, 2)
    for peer, kind in (("10.0.0.1", "watch"), ("10.0.0.1", "xds"), ("10.0.0.2", "watch")):
        slots.release(peer, kind)
    assert (slots.total, slots.peers()) == (0, 0)  # no per-peer entry left behind


def test_peer_ip() -> None:
    assert peer_ip("ipv4:10.1.2.3:50000") == "10.1.2.3"
    assert peer_ip("ipv6:[::1]:50000") == "::1"
    assert peer_ip("ipv6:%5B::1%5D:50000") == "::1"
    assert peer_ip("unix:/tmp/sock") == "unix"


async def test_oversize_request_is_refused_and_the_server_keeps_serving(tmp_path: Path) -> None:
    async with served(tmp_path, limits=Limits(max_message_bytes=2048)) as (_server, channel):
        stub = pb.LookasideStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Resolve(pb.Request(service="x" * 4096, namespace="default"), timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Watch(pb.WatchRequest(service="x" * 4096, namespace="default"), timeout=5).read()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # a request just under the limit still gets its (validation) answer
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Resolve(pb.Request(service="x" * 1500, namespace="default"), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await stub.Resolve(pb.Request(service="greet", namespace="default"), timeout=5)).port


async def test_static_source_honours_max_targets(tmp_path: Path) -> None:
    async with served(tmp_path, max_targets=2) as (server, channel):
        stub = pb.LookasideStub(channel)
        for svc in ("greet", "echo"):
            assert (await stub.Resolve(pb.Request(service=svc, namespace="default"), timeout=5)).port
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Resolve(pb.Request(service="third", namespace="default"), timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-targets" in (e.value.details() or "")
        assert limit_hits(server, "max_targets") == 1
        # targets already tracked keep working
        assert (await stub.Resolve(pb.Request(service="greet", namespace="default"), timeout=5)).port


async def test_max_concurrent_rpcs(tmp_path: Path) -> None:
    async with served(tmp_path, limits=Limits(max_concurrent_rpcs=1)) as (_server, channel):
        stub = pb.LookasideStub(channel)
        watch = await open_watch(stub)  # holds the one RPC slot
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Resolve(pb.Request(service="greet", namespace="default"), timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        watch.cancel()

        async def resolves() -> bool:
            try:
                await stub.Resolve(pb.Request(service="greet", namespace="default"), timeout=5)
            except grpc.aio.AioRpcError:
                return False
            return True

        await wait_until(resolves, what="Resolve after the Watch ended")


def test_server_options() -> None:
    opts = dict(Limits().server_options())
    assert opts["grpc.max_receive_message_length"] == 65536
    assert opts["grpc.server.max_pending_requests"] == 1000  # grpc's own default
    # rapid reset: streams (reset ones too, until released) per connection, REFUSED_STREAM beyond
    assert opts["grpc.max_concurrent_streams"] == 256 and opts["grpc.http.overload_protection"] == 1
    assert opts["grpc.keepalive_time_ms"] == 60_000 and opts["grpc.keepalive_timeout_ms"] == 20_000
    assert opts["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert opts["grpc.keepalive_permit_without_calls"] == 1 and opts["grpc.http2.max_pings_without_data"] == 0
    assert opts["grpc.max_connection_idle_ms"] == 300_000 and "grpc.max_connection_age_ms" not in opts
    aged = dict(Limits(max_connection_age=600, max_connection_idle=None).server_options())
    assert aged["grpc.max_connection_age_ms"] == 600_000
    assert aged["grpc.max_connection_age_grace_ms"] == 30_000
    assert "grpc.max_connection_idle_ms" not in aged
    with pytest.raises(ValueError):
        Limits(max_watches=0)
    with pytest.raises(ValueError):
        Limits(max_message_bytes=10)
    with pytest.raises(ValueError):
        Limits(max_streams_per_connection=0)
