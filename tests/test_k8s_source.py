"""The Kubernetes sources (EndpointSlices and the Endpoints fallback) driven through the lookaside gRPC API.

The real official ``kubernetes`` client talks HTTP to lookaside_dev/kube_api.py; each answer is awaited on the
Watch stream (or with the test server's wait_* helpers) with a deadline: no sleeps as synchronisation.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from kubernetes import client

from lookaside_dev.kube_api import KubeAPIServer, endpoint, endpoint_slice, endpoints, service
from lookaside_dev.server_helpers import DEADLINE, bad_field
from lookaside_grpc import protocol as pb
from lookaside_server import AccessConfig, ListenConfig, LookasideServer, SecurityConfig, ServerConfig
from lookaside_server._sources.kubernetes import KubernetesSource, KubeTimings

NS = "default"
FAST = KubeTimings(
    resync_interval=60.0,
    watch_timeout=5.0,
    request_timeout=2.0,
    connect_timeout=1.0,
    backoff_base=0.05,
    backoff_cap=0.3,
)


@dataclass
class K8sServed:
    """A lookaside server on a Kubernetes source, its stub and the test API server behind it."""

    server: LookasideServer
    source: KubernetesSource
    stub: pb.LookasideStub
    kube: KubeAPIServer

    async def resolve(self, service: str = "greet", namespace: str = NS, **kw: Any) -> pb.Response:
        request = pb.Request(service=service, namespace=namespace, **kw)
        return await self.stub.Resolve(request, timeout=DEADLINE)

    def watch(self, service: str = "greet", namespace: str = NS, port: str = "") -> Any:
        return self.stub.Watch(pb.WatchRequest(service=service, namespace=namespace, port=port), timeout=60)


@asynccontextmanager
async def k8s_serve(
    kube: KubeAPIServer,
    *,
    kind: str = "endpointslices",
    timings: KubeTimings = FAST,
    allow_namespaces: frozenset[str] | None = None,
    **source_kw: Any,
) -> AsyncIterator[K8sServed]:
    """Start a LookasideServer whose source is the real official client pointed at ``kube``."""
    api = client.ApiClient(client.Configuration(host=kube.url))
    source = KubernetesSource(api, kind=kind, timings=timings, **source_kw)
    server = LookasideServer(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5),
            source=source,
            security=SecurityConfig(access=AccessConfig(namespaces=allow_namespaces)),
        )
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield K8sServed(server, source, pb.LookasideStub(channel), kube)
    finally:
        await channel.close()
        await server.stop(0.5)
        api.close()


async def next_set(
    stream: Any, check: Callable[[pb.EndpointSet], bool] = lambda m: True, timeout: float = DEADLINE
) -> pb.EndpointSet:
    """Read a Watch stream until a message satisfies ``check`` (fail after ``timeout`` seconds)."""

    async def loop() -> pb.EndpointSet:
        while True:
            msg = await stream.read()
            assert msg is not grpc.aio.EOF, "watch stream ended"
            if check(msg):
                return msg

    return await asyncio.wait_for(loop(), timeout)


def ips(msg: pb.EndpointSet | pb.Response) -> list[str]:
    return sorted(e.ip for e in msg.endpoints)


def addrs(msg: pb.EndpointSet | pb.Response) -> list[tuple[str, int]]:
    return sorted((e.ip, e.port) for e in msg.endpoints)


def watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kube-watch")]


async def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a blocking test-server call (stop/start/wait_*) without blocking the server's loop."""
    return await asyncio.to_thread(fn, *args, **kw)


@pytest.fixture
def kube() -> Iterator[KubeAPIServer]:
    with KubeAPIServer(bookmark_interval=0.2) as server:
        server.apply(service("greet", ports=[("grpc", 50051), ("http", 8080)]))
        yield server


@pytest.fixture(autouse=True)
def no_watch_thread_left() -> Iterator[None]:
    """Every test: once its server stopped, no watch thread may be left (they are joined on stop)."""
    yield
    assert watch_threads() == []


def greet_slice(name: str, eps: list[Any], **kw: Any) -> dict[str, Any]:
    return endpoint_slice(name, "greet", endpoints=eps, **kw)


# --- membership and conditions --------------------------------------------------------------------------


async def test_scale_up_down_and_not_ready(kube: KubeAPIServer) -> None:
    kube.apply(greet_slice("greet-a", ["10.0.0.1", "10.0.0.2"]))
    async with k8s_serve(kube) as s:
        first = await s.resolve()
        assert first.address in ("10.0.0.1", "10.0.0.2") and first.port == 50051
        stream = s.watch()
        assert ips(await next_set(stream)) == ["10.0.0.1", "10.0.0.2"]
        kube.apply(greet_slice("greet-a", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]))  # scale up
        assert ips(await next_set(stream)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        kube.apply(greet_slice("greet-a", ["10.0.0.1", "10.0.0.3"]))  # scale down
        assert ips(await next_set(stream)) == ["10.0.0.1", "10.0.0.3"]
        kube.apply(greet_slice("greet-a", ["10.0.0.1", endpoint("10.0.0.3", ready=False)]))  # not ready
        assert ips(await next_set(stream)) == ["10.0.0.1"]
        picks = await s.resolve(count=4)
        assert ips(picks) == ["10.0.0.1"] * 4
        kube.apply(greet_slice("greet-a", [endpoint("10.0.0.1", ready=False)]))  # none ready
        assert ips(await next_set(stream)) == []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        stream.cancel()


async def test_unset_conditions_follow_the_api_defaults(kube: KubeAPIServer) -> None:
    # ready unset = ready; serving unset = ready's value; terminating unset = false
    kube.apply(
        greet_slice(
            "greet-a",
            [
                endpoint("10.0.0.1", ready=None, serving=None, terminating=None),
                endpoint("10.0.0.2", ready=False, serving=None, terminating=None),
            ],
        )
    )
    async with k8s_serve(kube) as s:
        assert ips(await s.resolve(count=2)) == ["10.0.0.1", "10.0.0.1"]
        (target,) = s.server.registry.states()
        conds = {e.ip: (e.ready, e.serving, e.terminating) for e in target[0].endpoints or ()}
        assert conds == {"10.0.0.1": (True, True, False), "10.0.0.2": (False, False, False)}


async def test_terminating_excluded_then_serving_terminating_fallback(kube: KubeAPIServer) -> None:
    kube.apply(greet_slice("greet-a", ["10.0.0.1", "10.0.0.2"]))
    async with k8s_serve(kube) as s:
        stream = s.watch()
        assert ips(await next_set(stream)) == ["10.0.0.1", "10.0.0.2"]
        # a rolling update: 10.0.0.1 terminates (still serving); a ready one remains, so it is excluded
        kube.apply(
            greet_slice(
                "greet-a", [endpoint("10.0.0.1", ready=False, serving=True, terminating=True), "10.0.0.2"]
            )
        )
        assert ips(await next_set(stream)) == ["10.0.0.2"]
        # the last ready one goes: the serving-and-terminating ones are used rather than nothing
        kube.apply(
            greet_slice(
                "greet-a",
                [
                    endpoint("10.0.0.1", ready=False, serving=True, terminating=True),
                    endpoint("10.0.0.2", ready=False, serving=False, terminating=True),
                ],
            )
        )
        assert ips(await next_set(stream)) == ["10.0.0.1"]
        assert (await s.resolve()).address == "10.0.0.1"
        stream.cancel()


async def test_slices_are_merged_and_duplicates_kept_once(kube: KubeAPIServer) -> None:
    kube.apply(greet_slice("greet-a", ["10.0.0.1", "10.0.0.2"]))
    kube.apply(greet_slice("greet-b", ["10.0.0.3"]))
    async with k8s_serve(kube) as s:
        stream = s.watch()
        assert ips(await next_set(stream)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        # an update of one slice never replaces the others
        kube.apply(greet_slice("greet-b", ["10.0.0.3", "10.0.0.4"]))
        assert ips(await next_set(stream)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
        # the controller moves 10.0.0.2 to greet-c: for a moment it sits in two slices, listed once
        kube.apply(greet_slice("greet-c", ["10.0.0.2", "10.0.0.5"]))
        assert ips(await next_set(stream)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]
        kube.apply(greet_slice("greet-a", ["10.0.0.1"]))
        kube.delete("EndpointSlice", "default", "greet-b")
        assert ips(await next_set(stream, lambda m: len(m.endpoints) == 3)) == [
            "10.0.0.1",
            "10.0.0.2",
            "10.0.0.5",
        ]
        # another Service's slices never leak in
        kube.apply(endpoint_slice("other-a", "other", endpoints=["10.9.9.9"]))
        kube.apply(greet_slice("greet-a", ["10.0.0.1", "10.0.0.6"]))
        assert "10.9.9.9" not in ips(await next_set(stream))
        stream.cancel()


async def test_named_numeric_default_and_unknown_ports(kube: KubeAPIServer) -> None:
    # the slice lists http first; the default port still follows the Service (grpc first)
    kube.apply(greet_slice("greet-a", ["10.0.0.1", "10.0.0.2"], ports=[("http", 8080), ("grpc", 50051)]))
    async with k8s_serve(kube) as s:
        default = await s.resolve(count=2)
        assert {(e.port, e.port_name) for e in default.endpoints} == {(50051, "grpc")}
        http = await s.resolve(port="http", count=2)
        assert {(e.port, e.port_name) for e in http.endpoints} == {(8080, "http")}
        numeric = await s.resolve(port="8080")
        assert numeric.port == 8080
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve(port="metrics")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'metrics'" in (err.value.details() or "") and bad_field(err.value) == "port"
        stream = s.watch(port="http")
        assert addrs(await next_set(stream)) == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]
        stream.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await next_set(s.watch(port="9999"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_ipv6_slices_and_fqdn_slices_ignored(kube: KubeAPIServer) -> None:
    kube.apply(greet_slice("greet-v6", ["fd00::0001", "FD00:0:0:0:0:0:0:2"], address_type="IPv6"))
    kube.apply(greet_slice("greet-fqdn", ["backend.example.com"], address_type="FQDN"))
    async with k8s_serve(kube) as s:
        stream = s.watch()
        first = await next_set(stream)
        assert ips(first) == ["fd00::1", "fd00::2"]  # plain, normalised, no brackets: the client formats
        kube.apply(greet_slice("greet-v4", ["10.0.0.1"]))
        assert ips(await next_set(stream)) == ["10.0.0.1", "fd00::1", "fd00::2"]
        stream.cancel()


async def test_zone_and_for_zones_are_carried(kube: KubeAPIServer) -> None:
    kube.apply(
        greet_slice(
            "greet-a",
            [
                endpoint("10.0.0.1", zone="zone-a", for_zones=["zone-a"]),
                endpoint("10.0.0.2", zone="zone-b", for_zones=["zone-b", "zone-c"]),
            ],
        )
    )
    async with k8s_serve(kube) as s:
        stream = s.watch()
        first = await next_set(stream)
        assert {(e.ip, e.zone, tuple(e.for_zones)) for e in first.endpoints} == {
            ("10.0.0.1", "zone-a", ("zone-a",)),
            ("10.0.0.2", "zone-b", ("zone-b", "zone-c")),
        }
        kube.apply(greet_slice("greet-a", [endpoint("10.0.0.1", zone="zone-a", for_zones=["zone-b"])]))
        msg = await next_set(stream)
        assert [(e.zone, list(e.for_zones)) for e in msg.endpoints] == [("zone-a", ["zone-b"])]
        stream.cancel()


# --- existence --------------------------------------------------------------------------------------------


async def test_missing_service_empty_service_and_deleted_service(kube: KubeAPIServer) -> None:
    async with k8s_serve(kube) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve(service="nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await next_set(s.watch(service="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # greet exists without any slice: an existing target with no endpoints
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        stream = s.watch()
        assert list((await next_set(stream)).endpoints) == []
        kube.apply(greet_slice("greet-a", ["10.0.0.1"]))
        assert ips(await next_set(stream)) == ["10.0.0.1"]
        # the Service is deleted (its slices are garbage-collected): NOT_FOUND, the stream stays open
        kube.delete("Service", "default", "greet")
        kube.delete("EndpointSlice", "default", "greet-a")
        assert list((await next_set(stream)).endpoints) == []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # and it comes back
        kube.apply(service("greet"))
        kube.apply(greet_slice("greet-a", ["10.0.0.7"]))
        assert ips(await next_set(stream, lambda m: len(m.endpoints) > 0)) == ["10.0.0.7"]
        assert (await s.resolve()).address == "10.0.0.7"
        stream.cancel()


async def test_disallowed_namespace_is_permission_denied(kube: KubeAPIServer) -> None:
    kube.apply(service("greet", namespace="prod"))
    async with k8s_serve(kube, allow_namespaces=frozenset({"default"})) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve(namespace="prod")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "--allow-namespace" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await next_set(s.watch(namespace="prod"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert kube.request_count(resource="services") == 0  # refused before the API is asked
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # allowed: exists, no endpoints


# --- watch robustness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("expired_watch", ["http", "event"])
async def test_410_gone_relists(expired_watch: str) -> None:
    with KubeAPIServer(bookmark_interval=0.2, expired_watch=expired_watch) as kube:
        kube.apply(service("greet"))
        kube.apply(greet_slice("greet-a", ["10.0.0.1"]))
        async with k8s_serve(kube) as s:
            stream = s.watch()
            assert ips(await next_set(stream)) == ["10.0.0.1"]
            assert await in_thread(kube.wait_for_open_watches, 1, resource="endpointslices")
            lists = kube.request_count("list", "endpointslices")
            # an ERROR 410 event in the stream
            assert kube.inject_watch_error(410, resource="endpointslices") == 1
            kube.apply(greet_slice("greet-a", ["10.0.0.1", "10.0.0.2"]))
            assert ips(await next_set(stream)) == ["10.0.0.1", "10.0.0.2"]
            assert await in_thread(kube.wait_for_requests, lists + 1, "list", "endpointslices")
            # compaction, then the stream ends: resuming from the old resourceVersion answers 410
            assert await in_thread(kube.wait_for_open_watches, 1, resource="endpointslices")
            kube.apply(greet_slice("greet-a", ["10.0.0.3"]))
            assert ips(await next_set(stream)) == ["10.0.0.3"]
            lists = kube.request_count("list", "endpointslices")
            # moves the resourceVersion past ours (another namespace: our watches see nothing of it)
            kube.apply(endpoint_slice("other", "other", namespace="elsewhere"))
            kube.compact()
            kube.close_watches()
            assert await in_thread(kube.wait_for_requests, lists + 1, "list", "endpointslices")
            kube.apply(greet_slice("greet-a", ["10.0.0.4"]))
            assert ips(await next_set(stream)) == ["10.0.0.4"]
            info = s.source.describe(s.source.watched[0])
            assert info["restarts"] >= 2 and info["slices"] == 1
            assert int(info["resource_version"]) >= kube.compacted_resource_version
            stream.cancel()


async def test_bookmarks_advance_the_resource_version(kube: KubeAPIServer) -> None:
    kube.apply(greet_slice("greet-a", ["10.0.0.1"]))
    async with k8s_serve(kube) as s:
        await s.resolve()
        assert await in_thread(kube.wait_for_open_watches, 2)  # Services and EndpointSlices of default
        for i in range(3):  # writes elsewhere: the default watches see only bookmarks
            kube.apply(endpoint_slice(f"other-{i}", "other", namespace="elsewhere"))
        rv = kube.resource_version
        assert kube.bookmark() == 2
        target = s.source.watched[0]
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while int(s.source.describe(target)["resource_version"]) < rv:
            assert asyncio.get_running_loop().time() < deadline, "bookmark not applied"
            await asyncio.sleep(0.01)
        assert s.source.describe(target)["watching"] == 1


async def test_api_errors_back_off_and_keep_serving(kube: KubeAPIServer) -> None:
    kube.apply(greet_slice("greet-a", ["10.0.0.1"]))
    # the first subscription fails while the API answers 500: UNAVAILABLE, and the next call works
    kube.fail_next(1, 500, verb="list")
    async with k8s_serve(kube) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "500" in (err.value.details() or "")
        stream = s.watch()
        assert ips(await next_set(stream)) == ["10.0.0.1"]
        assert await in_thread(kube.wait_for_open_watches, 2)
        watches = kube.request_count("watch", "endpointslices")
        kube.fail_next(3, 500, path="endpointslices", verb="watch")
        # an ERROR event that is not 410: back off, resume the watch
        kube.inject_watch_error(500, resource="endpointslices")
        assert await in_thread(kube.wait_for_requests, watches + 4, "watch", "endpointslices")
        assert (await s.resolve()).address == "10.0.0.1"  # still answering from the last known set
        kube.apply(greet_slice("greet-a", ["10.0.0.2"]))
        assert ips(await next_set(stream)) == ["10.0.0.2"]
        info = s.source.describe(s.source.watched[0])
        assert info["errors"] >= 4 and "500" in str(info["last_error"])
        stream.cancel()


async def test_api_down_then_back(kube: KubeAPIServer) -> None:
    kube.apply(greet_slice("greet-a", ["10.0.0.1", "10.0.0.2"]))
    async with k8s_serve(kube) as s:
        stream = s.watch()
        assert ips(await next_set(stream)) == ["10.0.0.1", "10.0.0.2"]
        assert await in_thread(kube.wait_for_open_watches, 2)
        await in_thread(kube.stop, abrupt=True)
        kube.apply(greet_slice("greet-a", ["10.0.0.2", "10.0.0.3"]))  # changes while the API is away
        errors_seen = kube.request_count()
        # the server keeps answering from the last known set
        for _ in range(3):
            assert ips(await s.resolve(count=2, router=pb.ROUNDROBIN)) == ["10.0.0.1", "10.0.0.2"]
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while s.source.describe(s.source.watched[0])["errors"] < 2:  # it keeps retrying (refused)
            assert asyncio.get_running_loop().time() < deadline, "no reconnect attempts"
            await asyncio.sleep(0.02)
        assert kube.request_count() == errors_seen  # nothing reached the stopped server
        await in_thread(kube.start)
        assert ips(await next_set(stream)) == ["10.0.0.2", "10.0.0.3"]  # converges to the API's state
        assert ips(await s.resolve(count=2, router=pb.ROUNDROBIN)) == ["10.0.0.2", "10.0.0.3"]
        stream.cancel()


async def test_periodic_resync_relists_without_new_versions(kube: KubeAPIServer) -> None:
    kube.apply(greet_slice("greet-a", ["10.0.0.1"]))
    timings = KubeTimings(
        resync_interval=0.3,
        watch_timeout=5.0,
        request_timeout=2.0,
        connect_timeout=1.0,
        backoff_base=0.05,
        backoff_cap=0.3,
    )
    async with k8s_serve(kube, timings=timings) as s:
        first = await s.resolve()
        lists = kube.request_count("list", "endpointslices")
        assert await in_thread(kube.wait_for_requests, lists + 2, "list", "endpointslices")
        again = await s.resolve()
        assert again.version == first.version  # an unchanged re-list publishes no new version


# --- lazy and bounded -------------------------------------------------------------------------------------


async def test_idle_target_is_unwatched_then_rewatched(kube: KubeAPIServer) -> None:
    kube.apply(greet_slice("greet-a", ["10.0.0.1"]))
    kube.apply(service("other"))
    kube.apply(service("lonely", namespace="prod"))
    async with k8s_serve(kube, idle_timeout=0.3) as s:
        assert kube.open_watch_count() == 0  # lazy: nothing watched before a client asks
        stream = s.watch(service="other")  # a live Watch keeps its target subscribed
        await next_set(stream)
        await s.resolve()
        # one namespace in use: one watch of its Services and one of its EndpointSlices, shared
        assert await in_thread(kube.wait_for_open_watches, 2, namespace="default")
        lists = kube.request_count("list")
        with pytest.raises(grpc.aio.AioRpcError):
            await s.resolve(service="lonely", namespace="prod")  # exists, no endpoints
        assert await in_thread(kube.wait_for_open_watches, 2, namespace="prod")
        assert kube.request_count("list") == lists + 2
        deadline = asyncio.get_running_loop().time() + 5.0
        while [str(t) for t in s.source.watched] != ["other.default"]:  # greet and lonely expire
            assert asyncio.get_running_loop().time() < deadline, s.source.watched
            await asyncio.sleep(0.02)
        assert [row.target for row in s.server.status()] == ["other.default"]
        # prod has no target left: its watches end; default's stay for other's live Watch
        assert await in_thread(kube.wait_for_open_watches, 0, 5.0, namespace="prod")
        assert s.source.watched_namespaces == ["default"]
        assert not await in_thread(kube.wait_for_open_watches, 0, 0.8, namespace="default")
        lists = kube.request_count("list")
        assert (await s.resolve()).address == "10.0.0.1"  # subscribed afresh, from the namespace watch
        assert kube.request_count("list") == lists and kube.request_count("get") == 0
        stream.cancel()
        assert await in_thread(kube.wait_for_open_watches, 0, 5.0)  # both idle now, then the namespace
        assert s.source.watched == [] and s.source.watched_namespaces == []


async def test_one_watch_per_namespace_shared_by_its_services(kube: KubeAPIServer) -> None:
    names = {"default": [f"svc-{i}" for i in range(12)], "prod": [f"api-{i}" for i in range(5)]}
    for ns, services in names.items():
        for i, name in enumerate(services):
            kube.apply(service(name, namespace=ns))
            kube.apply(endpoint_slice(f"{name}-x1", name, namespace=ns, endpoints=[f"10.1.{i}.1"]))
    async with k8s_serve(kube) as s:
        answers = await asyncio.gather(
            *(s.resolve(service=name, namespace=ns) for ns, services in names.items() for name in services)
        )
        assert sorted(a.address for a in answers) == sorted(
            f"10.1.{i}.1" for services in names.values() for i in range(len(services))
        )
        assert await in_thread(kube.wait_for_open_watches, 4)
        assert (
            kube.open_watch_count(namespace="default") == 2 and kube.open_watch_count(namespace="prod") == 2
        )
        assert len(watch_threads()) == 4
        # one LIST of Services and one of EndpointSlices per namespace; no per-Service request at all
        assert (kube.request_count("list", "services"), kube.request_count("list", "endpointslices")) == (
            2,
            2,
        )
        assert kube.request_count("get") == 0
        # a Service that does not exist is answered from the namespace's Services, without asking the API
        requests = kube.request_count()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve(service="nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert kube.request_count() == requests
        # each change reaches the one Service it concerns
        stream = s.watch(service="svc-3")
        assert ips(await next_set(stream)) == ["10.1.3.1"]
        kube.apply(endpoint_slice("svc-3-x1", "svc-3", endpoints=["10.1.3.1", "10.1.3.2"]))
        assert ips(await next_set(stream)) == ["10.1.3.1", "10.1.3.2"]
        # a slice relabelled to another Service moves its endpoints there
        kube.apply(endpoint_slice("svc-3-x1", "svc-4", endpoints=["10.1.3.9"]))
        assert ips(await next_set(stream)) == []
        assert ips(await s.resolve(service="svc-4", count=2, router=pb.ROUNDROBIN)) == [
            "10.1.3.9",
            "10.1.4.1",
        ]
        # the Service is deleted: NOT_FOUND at once (the Services watch), its slices still there
        kube.delete("Service", "default", "svc-4")
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while True:
            try:
                await s.resolve(service="svc-4")
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
                break
            assert asyncio.get_running_loop().time() < deadline, "deleted Service still served"
            await asyncio.sleep(0.02)
        info = s.source.describe(s.source.watched[0])
        assert info["scope"] in ("default", "prod") and info["watching"] == 1
        stream.cancel()


async def test_cluster_wide_is_one_watch_for_every_namespace(kube: KubeAPIServer) -> None:
    for ns in ("default", "prod", "team-a"):
        kube.apply(service("api", namespace=ns))
        kube.apply(endpoint_slice("api-1", "api", namespace=ns, endpoints=[f"10.2.{len(ns)}.1"]))
    async with k8s_serve(kube, cluster_wide=True) as s:
        for ns in ("default", "prod", "team-a"):
            assert (await s.resolve(service="api", namespace=ns)).address == f"10.2.{len(ns)}.1"
        assert await in_thread(kube.wait_for_open_watches, 2)
        assert {r.namespace for r in kube.requests if r.verb in ("list", "watch")} == {None}
        assert len(watch_threads()) == 2 and s.source.watched_namespaces == ["*"]
        assert s.source.describe(s.source.watched[0])["scope"] == "*"
        stream = s.watch(service="api", namespace="team-a")
        assert ips(await next_set(stream)) == ["10.2.6.1"]
        kube.apply(endpoint_slice("api-1", "api", namespace="prod", endpoints=["10.2.4.2"]))  # elsewhere
        kube.apply(endpoint_slice("api-1", "api", namespace="team-a", endpoints=["10.2.6.2"]))
        assert ips(await next_set(stream)) == ["10.2.6.2"]  # only its own namespace's slice
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve(service="api", namespace="nowhere")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        stream.cancel()


async def test_target_cap_is_resource_exhausted(kube: KubeAPIServer) -> None:
    kube.apply(service("other"))
    async with k8s_serve(kube, max_targets=1) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve()  # the first target is tracked (it has no endpoints)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve(service="other")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-targets" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await next_set(s.watch(service="other"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- the Endpoints fallback and shutdown ------------------------------------------------------------------


async def test_endpoints_fallback_source(kube: KubeAPIServer) -> None:
    kube.apply(
        endpoints(
            "greet",
            addresses=["10.0.0.1", "10.0.0.2"],
            not_ready=["10.0.0.9"],
            ports=[("grpc", 50051), ("http", 8080)],
        )
    )
    kube.apply(endpoints("other", addresses=["10.9.9.9"]))
    async with k8s_serve(kube, kind="endpoints") as s:
        stream = s.watch()
        assert addrs(await next_set(stream)) == [("10.0.0.1", 50051), ("10.0.0.2", 50051)]
        assert (await s.resolve(port="http")).port == 8080
        kube.apply(endpoints("greet", addresses=["10.0.0.2", "fd00::3"], ports=[("grpc", 50051)]))
        assert ips(await next_set(stream)) == ["10.0.0.2", "fd00::3"]
        await in_thread(kube.wait_for_open_watches, 1, resource="endpoints")
        kube.inject_watch_error(410)
        kube.delete("Endpoints", "default", "greet")
        assert ips(await next_set(stream)) == []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.resolve(service="missing")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert kube.request_count(resource="endpointslices") == 0
        stream.cancel()


async def test_shutdown_joins_every_watch_thread(kube: KubeAPIServer) -> None:
    targets = [("a", "default"), ("b", "default"), ("c", "prod")]
    for name, ns in targets:
        kube.apply(service(name, namespace=ns))
        kube.apply(endpoint_slice(f"{name}-1", name, namespace=ns, endpoints=["10.0.0.1"]))
    async with k8s_serve(kube) as s:
        streams = [s.watch(service=name, namespace=ns) for name, ns in targets]
        for stream in streams:
            await next_set(stream)
        assert await in_thread(kube.wait_for_open_watches, 4)  # 2 namespaces x (Services, EndpointSlices)
        assert len(watch_threads()) == 4
        assert all(not t.daemon for t in watch_threads())
    assert watch_threads() == []
    assert await in_thread(kube.wait_for_open_watches, 0)


async def test_shutdown_while_the_api_is_down(kube: KubeAPIServer) -> None:
    kube.apply(greet_slice("greet-a", ["10.0.0.1"]))
    async with k8s_serve(kube) as s:
        await s.resolve()
        assert await in_thread(kube.wait_for_open_watches, 2)
        await in_thread(kube.stop, abrupt=True)
        loop = asyncio.get_running_loop()
        started = loop.time()
    assert loop.time() - started < 5.0
    assert watch_threads() == []


async def test_an_idle_watch_lives_its_full_timeout_and_a_hung_api_does_not_block_shutdown() -> None:
    timings = KubeTimings(
        resync_interval=60.0,
        watch_timeout=2.0,
        request_timeout=0.5,
        connect_timeout=1.0,
        backoff_base=0.05,
        backoff_cap=0.3,
    )
    with KubeAPIServer(bookmark_interval=3600) as kube:  # no bookmarks: nothing arrives on the stream
        kube.apply(service("greet"))
        kube.apply(greet_slice("greet-a", ["10.0.0.1"]))
        async with k8s_serve(kube, timings=timings) as s:
            await s.resolve()
            assert await in_thread(kube.wait_for_requests, 2, "watch", "endpointslices", 6.0)
            info = s.source.describe(s.source.watched[0])
            assert info["errors"] == 0, info  # idle past request_timeout: no read timeout
            # the API now accepts connections but answers nothing: shutdown still returns promptly
            kube.set_delay(30)
            kube.close_watches()
            assert await in_thread(kube.wait_for_requests, 3, "watch", "endpointslices")
            loop = asyncio.get_running_loop()
            started = loop.time()
        assert loop.time() - started < 5.0
        assert watch_threads() == []
        kube.set_delay(0)
