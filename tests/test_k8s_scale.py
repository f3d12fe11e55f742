"""The Kubernetes source at a bounded scale: 300 Services cost O(namespaces) threads and API watches, not
O(Services). (2,000 Services, memory and latency: ``python -m benchmarks.k8s_scale``.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from kubernetes import client

from lookaside_dev.kube_api import KubeAPIServer, endpoint_slice, service
from lookaside_dev.server_helpers import DEADLINE
from lookaside_grpc import protocol as pb
from lookaside_server import ListenConfig, LookasideServer, ServerConfig
from lookaside_server._sources.kubernetes import KubernetesSource, KubeTimings

SERVICES, NAMESPACES = 300, 3
TIMINGS = KubeTimings(
    resync_interval=600.0,
    watch_timeout=120.0,
    request_timeout=5.0,
    connect_timeout=2.0,
    backoff_base=0.05,
    backoff_cap=0.3,
)


def _target(i: int) -> tuple[str, str]:
    return f"svc-{i}", f"ns-{i % NAMESPACES}"


def watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kube-watch")]


@asynccontextmanager
async def serve(kube: KubeAPIServer, **source_kw: Any) -> AsyncIterator[tuple[KubernetesSource, Any]]:
    """A LookasideServer on the Kubernetes source (the real client pointed at ``kube``) and its stub."""
    api = client.ApiClient(client.Configuration(host=kube.url))
    source = KubernetesSource(api, timings=TIMINGS, **source_kw)
    server = LookasideServer(
        ServerConfig(listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5), source=source)
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield source, pb.LookasideStub(channel)
    finally:
        await channel.close()
        await server.stop(0.5)
        api.close()


@pytest.fixture(scope="module")
def many() -> Iterator[KubeAPIServer]:
    with KubeAPIServer(bookmark_interval=30.0) as kube:
        for i in range(SERVICES):
            name, ns = _target(i)
            kube.apply(service(name, namespace=ns))
            kube.apply(
                endpoint_slice(f"{name}-1", name, namespace=ns, endpoints=[f"10.{i // 200}.{i % 200}.1"])
            )
        yield kube


@pytest.fixture(autouse=True)
def no_watch_thread_left() -> Iterator[None]:
    yield
    assert watch_threads() == []


@pytest.mark.parametrize("cluster_wide", [False, True], ids=["per-namespace", "cluster-wide"])
async def test_hundreds_of_services_share_their_namespace_watches(
    many: KubeAPIServer, cluster_wide: bool
) -> None:
    many.reset_counters()
    async with serve(many, cluster_wide=cluster_wide, max_targets=SERVICES) as (source, stub):
        sem = asyncio.Semaphore(32)

        async def resolve(i: int) -> str:
            name, ns = _target(i)
            async with sem:
                return (await stub.Resolve(pb.Request(service=name, namespace=ns), timeout=DEADLINE)).address

        answers = await asyncio.gather(*(resolve(i) for i in range(SERVICES)))
        assert answers == [f"10.{i // 200}.{i % 200}.1" for i in range(SERVICES)]
        assert len(source.watched) == SERVICES
        scopes = 1 if cluster_wide else NAMESPACES
        # two watches (Services, EndpointSlices) per namespace, or two in all: not one per Service
        assert await asyncio.to_thread(many.wait_for_open_watches, 2 * scopes)
        assert len(watch_threads()) == 2 * scopes
        assert many.request_count("list") == 2 * scopes and many.request_count("get") == 0
        assert many.request_count("watch") == 2 * scopes
        # a write reaches the Watch of the one Service it concerns
        name, ns = _target(SERVICES - 1)
        stream = stub.Watch(pb.WatchRequest(service=name, namespace=ns), timeout=60)
        assert [e.ip for e in (await stream.read()).endpoints] == ["10.1.99.1"]
        started = time.monotonic()
        many.apply(endpoint_slice(f"{name}-1", name, namespace=ns, endpoints=["10.9.9.9"]))
        update = await asyncio.wait_for(stream.read(), DEADLINE)
        assert [e.ip for e in update.endpoints] == ["10.9.9.9"]
        assert time.monotonic() - started < 2.0
        stream.cancel()
        many.apply(endpoint_slice(f"{name}-1", name, namespace=ns, endpoints=["10.1.99.1"]))  # as it was
    assert await asyncio.to_thread(many.wait_for_open_watches, 0)
