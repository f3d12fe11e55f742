"""Service ports (issue 13 item 1): a port number means the Service's ``spec.ports[].port``, mapped through
that port's name to each endpoint's own (target) port from its EndpointSlice.

On the Kubernetes API test server (real official client): ``port: 80, targetPort: 50051``, and a named
``targetPort`` that resolves to different numbers on different pods (each endpoint keeps its own), through
Resolve, Watch and xDS names; a target-port number is refused with a hint naming the Service port. Then the
static file's ``service_port``, the client (``port=80``) and the CLI.
"""

from __future__ import annotations

import asyncio
import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from kubernetes import client

import lookaside_grpc
from examples.greet import greet_pb2_grpc
from lookaside_dev.fakes import Backends, req
from lookaside_dev.kube_api import KubeAPIServer, endpoint_slice, endpoints, service
from lookaside_dev.server_helpers import DEADLINE, bad_field
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb
from lookaside_grpc._cli import EXIT_INVALID_ARGUMENT, EXIT_OK
from lookaside_server import ListenConfig, LookasideServer, ServerConfig, StaticFileConfig, run_in_thread
from lookaside_server._core.model import BackendEndpoint
from lookaside_server._core.ports import UnknownPort, select_port
from lookaside_server._sources.kube_objects import service_info, slice_member, with_service_ports
from lookaside_server._sources.kubernetes import KubernetesSource, KubeTimings
from lookaside_server._sources.static import StaticFileError, parse_static
from lookaside_server._xds.resources import ENDPOINTS

NS = "default"
FAST = KubeTimings(
    resync_interval=60.0,
    watch_timeout=5.0,
    request_timeout=2.0,
    connect_timeout=1.0,
    backoff_base=0.05,
    backoff_cap=0.3,
)


# --- select_port: the rule itself ---------------------------------------------------------------------------


def ep(ip: str, port: int, name: str = "", service_port: int = 0) -> BackendEndpoint:
    return BackendEndpoint(ip, port, name, service_port=service_port)


def test_a_number_is_the_service_port_a_target_port_is_refused_with_a_hint() -> None:
    eps = (
        ep("10.0.0.1", 50051, "grpc", 80),
        ep("10.0.0.2", 50052, "grpc", 80),  # a named targetPort: another number on this pod
        ep("10.0.0.1", 8080, "http", 8080),
    )
    for asked in ("80", "080", "grpc", ""):
        key, chosen = select_port(eps, asked)
        assert key == "grpc"  # one rotation however the port is spelled
        assert [(e.ip, e.port) for e in chosen] == [("10.0.0.1", 50051), ("10.0.0.2", 50052)]
    assert [e.port for e in select_port(eps, "8080")[1]] == [8080]
    with pytest.raises(UnknownPort) as err:
        select_port(eps, "50051")
    text = str(err.value)
    assert "port '50051' is not a port of the target (ports: grpc (80), http (8080))" in text
    assert "target port of Service port 80 'grpc'" in text and "ask for 80 or 'grpc'" in text
    with pytest.raises(UnknownPort) as err:
        select_port(eps, "9999")
    assert "target port" not in str(err.value)


def test_unnamed_service_port_and_endpoints_without_a_service_port() -> None:
    unnamed = (ep("10.0.0.1", 50051, "", 80),)
    assert select_port(unnamed, "80") == ("80", unnamed)
    with pytest.raises(
        UnknownPort, match=r"\(ports: 80\); 50051 is the pods' target port of Service port 80:"
    ):
        select_port(unnamed, "50051")
    local = (ep("127.0.0.1", 50051), ep("127.0.0.1", 50052))  # no Service port known: numbered by their own
    assert select_port(local, "50052")[1] == local[1:]


def test_conversion_numbers_endpoints_by_port_name() -> None:
    svc = service_info(service("greet", ports=[{"name": "grpc", "port": 80, "targetPort": "grpc-port"}]))
    assert svc.port_numbers == {"grpc": 80}
    obj = endpoint_slice(
        "greet-a", "greet", endpoints=["10.0.0.1"], ports=[("grpc", 50052), ("metrics", 9090)]
    )
    member = slice_member(obj, lambda name: svc.port_numbers if name == "greet" else {})
    assert member is not None
    assert [(e.port_name, e.port, e.service_port) for e in member[1]] == [
        ("grpc", 50052, 80),
        ("metrics", 9090, 0),
    ]
    unnumbered = slice_member(obj)
    assert unnumbered is not None and {e.service_port for e in unnumbered[1]} == {0}
    assert with_service_ports(member[1], {"grpc": 80}) is member[1]  # nothing changed: the same tuple
    renumbered = with_service_ports(member[1], {"grpc": 81, "metrics": 9091})
    assert [e.number for e in renumbered] == [81, 9091]


# --- on the Kubernetes API test server ----------------------------------------------------------------------


@dataclass
class Served:
    server: LookasideServer
    stub: Any  # pb.LookasideStub on an aio channel
    channel: grpc.aio.Channel

    async def resolve(self, port: str, count: int = 1, service: str = "greet") -> pb.Response:
        request = pb.Request(
            service=service, namespace=NS, port=port, count=count, router=pb.Request.ROUNDROBIN
        )
        return await self.stub.Resolve(request, timeout=DEADLINE)

    def watch(self, port: str, service: str = "greet") -> Any:
        return self.stub.Watch(pb.WatchRequest(service=service, namespace=NS, port=port), timeout=60)

    async def eds(self, name: str) -> set[tuple[str, int]]:
        """The addresses of the ClusterLoadAssignment a stock xDS client gets for ``xds:///name``."""
        ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        request = discovery_pb2.DiscoveryRequest(type_url=ENDPOINTS, resource_names=[name])
        request.node.id = "service-ports-test"
        call = ads.StreamAggregatedResources(iter([request]))
        try:
            response = await asyncio.wait_for(call.read(), DEADLINE)
        finally:
            call.cancel()
        out = set()
        for any_ in response.resources:
            cla = endpoint_pb2.ClusterLoadAssignment()
            assert any_.Unpack(cla)
            for locality in cla.endpoints:
                for lb in locality.lb_endpoints:
                    sa = lb.endpoint.address.socket_address
                    out.add((sa.address, sa.port_value))
        return out


@asynccontextmanager
async def k8s_serve(kube: KubeAPIServer, kind: str = "endpointslices") -> AsyncIterator[Served]:
    api = client.ApiClient(client.Configuration(host=kube.url))
    source = KubernetesSource(api, kind=kind, timings=FAST)
    server = LookasideServer(
        ServerConfig(listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5), source=source)
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Served(server, pb.LookasideStub(channel), channel)
    finally:
        await channel.close()
        await server.stop(0.5)
        api.close()


async def next_set(stream: Any, check: Any = lambda m: True) -> pb.EndpointSet:
    async def loop() -> pb.EndpointSet:
        while True:
            msg = await stream.read()
            assert msg is not grpc.aio.EOF, "watch stream ended"
            if check(msg):
                return msg

    return await asyncio.wait_for(loop(), DEADLINE)


def addrs(msg: pb.EndpointSet | pb.Response) -> list[tuple[str, int]]:
    return sorted((e.ip, e.port) for e in msg.endpoints)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_field(err.value) == "port"
    return err.value


@pytest.fixture
def kube() -> Iterator[KubeAPIServer]:
    with KubeAPIServer(bookmark_interval=0.2) as server:
        yield server


async def test_service_port_80_target_port_50051(kube: KubeAPIServer) -> None:
    kube.apply(
        service(
            "greet",
            ports=[
                {"name": "grpc", "port": 80, "targetPort": 50051},
                {"name": "http", "port": 8080, "targetPort": 8081},
            ],
        )
    )
    kube.apply(
        endpoint_slice(
            "greet-a", "greet", endpoints=["10.0.0.1", "10.0.0.2"], ports=[("grpc", 50051), ("http", 8081)]
        )
    )
    both = [("10.0.0.1", 50051), ("10.0.0.2", 50051)]
    async with k8s_serve(kube) as s:
        for port in ("80", "grpc", ""):
            assert addrs(await s.resolve(port, count=2)) == both
        assert (await s.resolve("8080")).port == 8081  # the Service port 8080 is the pods' 8081
        err = await refused(s.resolve("50051"))
        assert "50051 is the pods' target port of Service port 80 'grpc'" in (err.details() or "")
        await refused(s.resolve("8081"))
        stream = s.watch("80")
        assert addrs(await next_set(stream)) == both
        await refused(next_set(s.watch("50051")))
        assert await s.eds("greet.default:80") == set(both)
        assert await s.eds("greet.default:grpc") == set(both)
        assert await s.eds("greet.default:8080") == {("10.0.0.1", 8081), ("10.0.0.2", 8081)}
        assert await s.eds("greet.default:50051") == set()  # no such Service port: no endpoints

        # the Service's port number changes: asking by the old number finds nothing, by name still all
        by_name = s.watch("grpc")
        assert addrs(await next_set(by_name)) == both
        kube.apply(
            service(
                "greet",
                ports=[
                    {"name": "grpc", "port": 81, "targetPort": 50051},
                    {"name": "http", "port": 8080, "targetPort": 8081},
                ],
            )
        )
        assert addrs(await next_set(stream)) == []
        assert addrs(await s.resolve("81", count=2)) == both
        await refused(s.resolve("80"))
        kube.apply(
            endpoint_slice(
                "greet-a", "greet", endpoints=["10.0.0.1"], ports=[("grpc", 50051), ("http", 8081)]
            )
        )
        # (by name, the Service port change was a new version with the same endpoints)
        assert addrs(await next_set(by_name, lambda m: len(m.endpoints) == 1)) == [("10.0.0.1", 50051)]
        stream.cancel()
        by_name.cancel()


async def test_named_target_port_differs_per_pod(kube: KubeAPIServer) -> None:
    # targetPort "grpc-port": the pods of one Deployment version listen on 50051, the next on 50052; the
    # EndpointSlice controller puts them in two slices, each with its own port number under the name "grpc"
    kube.apply(service("greet", ports=[{"name": "grpc", "port": 80, "targetPort": "grpc-port"}]))
    kube.apply(
        endpoint_slice("greet-old", "greet", endpoints=["10.0.0.1", "10.0.0.2"], ports=[("grpc", 50051)])
    )
    kube.apply(endpoint_slice("greet-new", "greet", endpoints=["10.0.0.3"], ports=[("grpc", 50052)]))
    every = [("10.0.0.1", 50051), ("10.0.0.2", 50051), ("10.0.0.3", 50052)]
    async with k8s_serve(kube) as s:
        for port in ("80", "grpc", ""):
            assert addrs(await s.resolve(port, count=3)) == every
        picks = [(r.address, r.port) for r in [await s.resolve("80") for _ in range(3)]]
        assert sorted(picks) == every  # one rotation over all three, each at its own port
        stream = s.watch("80")
        assert addrs(await next_set(stream)) == every
        assert await s.eds("greet.default:80") == set(every)
        err = await refused(s.resolve("50052"))
        assert "Service port 80 'grpc'" in (err.details() or "")
        # the rollout finishes: the old pods go, a new one comes, each keeps its own number
        kube.delete("EndpointSlice", NS, "greet-old")
        kube.apply(
            endpoint_slice("greet-new", "greet", endpoints=["10.0.0.3", "10.0.0.4"], ports=[("grpc", 50052)])
        )
        assert addrs(await next_set(stream, lambda m: len(m.endpoints) == 2)) == [
            ("10.0.0.3", 50052),
            ("10.0.0.4", 50052),
        ]
        stream.cancel()


async def test_unnamed_single_port_service_and_slices_before_their_service(kube: KubeAPIServer) -> None:
    kube.apply(endpoint_slice("solo-a", "solo", endpoints=["10.0.1.1"], ports=[50051]))
    kube.apply(service("other"))
    async with k8s_serve(kube) as s:
        stream = s.watch("", service="other")
        await next_set(stream)
        # the Service appears after its slice: the slice's endpoints get its port number then
        kube.apply(service("solo", ports=[{"port": 80, "targetPort": 50051}]))
        await refused_or_found(s)
        assert addrs(await s.resolve("80", service="solo")) == [("10.0.1.1", 50051)]
        assert addrs(await s.resolve("", service="solo")) == [("10.0.1.1", 50051)]
        err = await refused(s.resolve("50051", service="solo"))
        assert "Service port 80: a number means the Service port" in (err.details() or "")
        assert await s.eds("solo.default:80") == {("10.0.1.1", 50051)}
        stream.cancel()


async def refused_or_found(s: Served) -> None:
    """Wait until the lookaside knows the Service ``solo`` (NOT_FOUND until its Service event arrived)."""
    for _ in range(200):
        try:
            await s.resolve("80", service="solo")
            return
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
            await asyncio.sleep(0.02)
    raise AssertionError("Service solo never appeared")


async def test_endpoints_fallback_maps_service_ports_too(kube: KubeAPIServer) -> None:
    kube.apply(service("greet", ports=[{"name": "grpc", "port": 80, "targetPort": 50051}]))
    kube.apply(endpoints("greet", addresses=["10.0.0.1"], ports=[("grpc", 50051)]))
    async with k8s_serve(kube, kind="endpoints") as s:
        assert addrs(await s.resolve("80")) == [("10.0.0.1", 50051)]
        await refused(s.resolve("50051"))


# --- the static file: optional service_port ----------------------------------------------------------------


def test_static_service_port_field_and_its_checks() -> None:
    contents = parse_static(
        "default/greet:\n"
        "  - {ip: 10.0.0.1, port: 50051, port_name: grpc, service_port: 80}\n"
        "  - {ip: 10.0.0.2, port: 50052, port_name: grpc, service_port: 80}\n"
        "  - {ip: 10.0.0.1, port: 9090}\n"
    )
    eps = next(iter(contents.values()))
    assert [(e.port, e.service_port, e.number) for e in eps] == [
        (50051, 80, 80),
        (50052, 80, 80),
        (9090, 0, 9090),
    ]
    assert [e.port for e in select_port(eps, "80")[1]] == [50051, 50052]
    assert [e.port for e in select_port(eps, "9090")[1]] == [9090]
    bad = {
        "service_port: 0": "service_port must be an integer in 1..65535",
        "service_port: '80'": "service_port must be an integer in 1..65535",
        "service_port: true": "service_port must be an integer in 1..65535",
    }
    for field, message in bad.items():
        with pytest.raises(StaticFileError, match=message):
            parse_static(f"default/greet:\n  - {{ip: 10.0.0.1, port: 50051, {field}}}\n")
    with pytest.raises(StaticFileError, match=r"'grpc' has different service_port values \(none, 80\)"):
        parse_static(
            "default/greet:\n"
            "  - {ip: 10.0.0.1, port: 50051, port_name: grpc, service_port: 80}\n"
            "  - {ip: 10.0.0.2, port: 50051, port_name: grpc}\n"
        )
    with pytest.raises(StaticFileError, match="service_port 80 is given to 'grpc' and 'http'"):
        parse_static(
            "default/greet:\n"
            "  - {ip: 10.0.0.1, port: 50051, port_name: grpc, service_port: 80}\n"
            "  - {ip: 10.0.0.1, port: 8080, port_name: http, service_port: 80}\n"
        )


@pytest.fixture
def static_greet(tmp_path: pathlib.Path) -> Iterator[tuple[str, Backends]]:
    """Two real Greet backends behind Service port 80 ('grpc') in a static file, and the lookaside."""
    path = tmp_path / "endpoints.yaml"
    with Backends(2) as backends:
        items = []
        for address in backends.addresses:
            ip, port = address.rsplit(":", 1)
            items.append({"ip": ip, "port": int(port), "port_name": "grpc", "service_port": 80})
        write_static(path, {"default/greet": items})
        config = ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0), source=StaticFileConfig(path, poll_interval=0.02)
        )
        with run_in_thread(config) as srv:
            yield srv.address, backends


def test_client_port_80_calls_the_pods_own_ports(static_greet: tuple[str, Backends]) -> None:
    address, backends = static_greet
    for ch in (
        lookaside_grpc.channel("greet.default:80", lookaside=address),
        lookaside_grpc.channel("greet", namespace="default", port=80, lookaside=address, mode="per_call"),
    ):
        with ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            for _ in range(4):
                assert stub.Greet(req(), timeout=5).result.startswith("Hello Ada")
    assert backends.calls() == [4, 4]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lookaside_grpc", *args], capture_output=True, text=True, timeout=30
    )


def test_cli_takes_the_service_port_and_names_it_for_a_target_port(
    static_greet: tuple[str, Backends],
) -> None:
    address, backends = static_greet
    proc = cli("resolve", "greet.default:80", "--server", address, "--count", "2")
    assert proc.returncode == EXIT_OK, proc.stderr
    for backend in backends.addresses:
        assert backend in proc.stdout
    proc = cli("resolve", "greet.default", "--port", "grpc", "--server", address)
    assert proc.returncode == EXIT_OK, proc.stderr
    target_port = backends.addresses[0].rsplit(":", 1)[1]
    proc = cli("resolve", f"greet.default:{target_port}", "--server", address)
    assert proc.returncode == EXIT_INVALID_ARGUMENT
    assert "Service port 80 'grpc'" in proc.stderr and "ask for 80 or 'grpc'" in proc.stderr
    assert "--port takes the Service port's name or number (spec.ports[].port)" in proc.stderr


def test_readme_static_example_with_service_port_parses() -> None:
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    (block,) = [b for b in blocks if "service_port" in b]
    eps = next(iter(parse_static(block).values()))
    assert [(e.port, e.number) for e in select_port(eps, "80")[1]] == [(50051, 80), (50052, 80)]
