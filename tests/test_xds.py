"""xDS control plane: resource building, naming, and the ADS protocol (ACK/NACK, state of the world)
driven by a raw ADS client built from the xds-protos stubs against the real lookaside server."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from lookaside_dev.static_files import write_addresses
from lookaside_server import (
    AccessConfig,
    BackendEndpoint,
    HttpConfig,
    ListenConfig,
    RunningServer,
    SecurityConfig,
    ServerConfig,
    StaticFileConfig,
    Target,
    XdsConfig,
    run_in_thread,
)
from lookaside_server._xds.resources import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    ROUTE,
    ROUTER_FILTER,
    XdsOptions,
    cluster,
    listener,
    load_assignment,
    route_configuration,
)

NAME = "greet.default"
A, B, C = "10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"


# --- names and resources ---------------------------------------------------------------------------------


def unpack_hcm(lis: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    assert lis.api_listener.api_listener.Unpack(hcm)
    return hcm


def test_listener_inline_routes_with_router_filter_last() -> None:
    lis = listener(NAME, XdsOptions())
    assert lis.name == NAME
    hcm = unpack_hcm(lis)
    assert hcm.http_filters[-1].name == ROUTER_FILTER
    assert hcm.http_filters[-1].typed_config.Is(router_pb2.Router.DESCRIPTOR)
    assert hcm.WhichOneof("route_specifier") == "route_config"
    assert hcm.route_config == route_configuration(NAME)


def test_listener_of_an_alias_routes_to_the_canonical_cluster() -> None:
    lis = listener("greet.default.svc:05001", XdsOptions(), "greet.default:5001")
    assert lis.name == "greet.default.svc:05001"  # the name the client dialled
    hcm = unpack_hcm(lis)
    assert hcm.route_config == route_configuration("greet.default:5001")
    assert hcm.route_config.virtual_hosts[0].routes[0].route.cluster == "greet.default:5001"
    hcm = unpack_hcm(listener("greet.default.svc:05001", XdsOptions(rds=True), "greet.default:5001"))
    assert hcm.rds.route_config_name == "greet.default:5001"


def test_listener_with_rds() -> None:
    hcm = unpack_hcm(listener(NAME, XdsOptions(rds=True)))
    assert hcm.WhichOneof("route_specifier") == "rds"
    assert hcm.rds.route_config_name == NAME
    assert hcm.rds.config_source.WhichOneof("config_source_specifier") == "ads"
    assert hcm.http_filters[-1].name == ROUTER_FILTER


def test_route_configuration_routes_everything_to_the_cluster() -> None:
    rc = route_configuration(NAME)
    (vh,) = rc.virtual_hosts
    assert rc.name == NAME and list(vh.domains) == ["*"]
    (route,) = vh.routes
    assert route.match.prefix == "" and route.route.cluster == NAME


def test_cluster_is_eds_over_ads_round_robin_with_outlier_detection() -> None:
    c = cluster(NAME, XdsOptions())
    assert c.name == NAME and c.type == cluster_pb2.Cluster.EDS
    assert c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert c.eds_cluster_config.service_name == NAME
    assert c.eds_cluster_config.eds_config.HasField("ads")
    assert c.eds_cluster_config.eds_config.resource_api_version == config_source_pb2.V3
    od = c.outlier_detection
    assert od.enforcing_failure_percentage.value == 0  # off: application errors would count
    assert od.enforcing_success_rate.value == 100 and od.success_rate_minimum_hosts.value == 5
    assert not cluster(NAME, XdsOptions(outlier_detection=None)).HasField("outlier_detection")


def test_load_assignment_has_one_weighted_locality_per_endpoint() -> None:
    eps = (
        BackendEndpoint("10.0.0.1", 8080, zone="a"),
        BackendEndpoint("10.0.0.2", 8080, zone="a"),
        BackendEndpoint("fd00::3", 9090),
    )
    cla = load_assignment(NAME, eps, XdsOptions())
    assert cla.cluster_name == NAME
    assert len(cla.endpoints) == 3
    for locality, e in zip(cla.endpoints, eps, strict=True):
        assert locality.HasField("load_balancing_weight") and locality.load_balancing_weight.value == 1
        (lb,) = locality.lb_endpoints
        assert lb.endpoint.address.socket_address.address == e.ip
        assert lb.endpoint.address.socket_address.port_value == e.port
        assert locality.locality.zone == e.zone
    assert len({lle.locality.SerializeToString() for lle in cla.endpoints}) == 3  # distinct localities
    weighted = load_assignment(NAME, eps, XdsOptions(weight=lambda e: e.port // 1000))
    assert [lle.load_balancing_weight.value for lle in weighted.endpoints] == [8, 8, 9]


# --- the ADS protocol against the real server -------------------------------------------------------------


class RawAds:
    """A raw ADS stream (grpc.aio) for protocol tests."""

    def __init__(self, address: str, node: str = "raw-client") -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.node = node
        self._queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self._first = True
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources(
            self._requests()
        )

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (request := await self._queue.get()) is not None:
            yield request

    def send(
        self,
        type_url: str,
        names: list[str],
        *,
        ack: discovery_pb2.DiscoveryResponse | None = None,
        nonce: str = "",
        version: str = "",
        error: str | None = None,
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=names, version_info=version, response_nonce=nonce
        )
        if ack is not None:
            request.version_info, request.response_nonce = ack.version_info, ack.nonce
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        if self._first:  # as gRPC: the node only on the stream's first request
            request.node.CopyFrom(base_pb2.Node(id=self.node, cluster="tests"))
            self._first = False
        self._queue.put_nowait(request)

    async def recv(self, timeout: float = 10.0) -> discovery_pb2.DiscoveryResponse:
        response = await asyncio.wait_for(self.call.read(), timeout)
        assert response is not grpc.aio.EOF, "stream ended"
        return response

    async def subscribe(self, type_url: str, names: list[str]) -> discovery_pb2.DiscoveryResponse:
        """Subscribe, receive the answer and ACK it."""
        self.send(type_url, names)
        response = await self.recv()
        assert response.type_url == type_url
        self.send(type_url, names, ack=response)
        return response

    async def close(self) -> None:
        self._queue.put_nowait(None)
        self.call.cancel()
        await self.channel.close()


def names_of(response: discovery_pb2.DiscoveryResponse, cls: type) -> dict[str, object]:
    out = {}
    for any_ in response.resources:
        assert any_.type_url == response.type_url
        msg = cls()
        assert any_.Unpack(msg)
        out[msg.cluster_name if cls is endpoint_pb2.ClusterLoadAssignment else msg.name] = msg
    return out


def eds_addresses(response: discovery_pb2.DiscoveryResponse, name: str = NAME) -> set[str]:
    cla = names_of(response, endpoint_pb2.ClusterLoadAssignment)[name]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    return {
        f"{lb.endpoint.address.socket_address.address}:{lb.endpoint.address.socket_address.port_value}"
        for lle in cla.endpoints
        for lb in lle.lb_endpoints
    }


@pytest.fixture
def static_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "endpoints.json"
    write_addresses(path, {"default/greet": [A, B]})
    return path


@pytest.fixture
def server(static_file: pathlib.Path) -> Iterator[Callable[..., RunningServer]]:
    running: list[RunningServer] = []

    def start(**config: object) -> RunningServer:
        srv = run_in_thread(
            ServerConfig(
                listen=ListenConfig(host="127.0.0.1", port=0, grace=5.0),
                source=StaticFileConfig(static_file, poll_interval=0.02),
                **config,
            )
        )  # type: ignore[arg-type]
        running.append(srv)
        return srv

    yield start
    for srv in running:
        srv.stop()


@pytest.fixture
async def ads() -> AsyncIterator[Callable[..., RawAds]]:
    clients: list[RawAds] = []

    def open_(address: str, node: str = "raw-client") -> RawAds:
        client = RawAds(address, node)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        await client.close()


def describe(srv: RunningServer) -> list[dict]:
    async def get() -> list[dict]:
        return srv.server.xds.describe()  # type: ignore[attr-defined]

    return asyncio.run_coroutine_threadsafe(get(), srv._loop).result(5)


async def test_full_handshake_then_only_changes_are_sent(
    server: Callable[..., RunningServer], ads: Callable[..., RawAds], static_file: pathlib.Path
) -> None:
    srv = server()
    client = ads(srv.address, node="node-7")
    lds = await client.subscribe(LISTENER, [NAME])
    assert lds.version_info == "1" and lds.nonce
    assert list(names_of(lds, listener_pb2.Listener)) == [NAME]
    cds = await client.subscribe(CLUSTER, [NAME])
    assert list(names_of(cds, cluster_pb2.Cluster)) == [NAME]
    eds = await client.subscribe(ENDPOINTS, [NAME])
    assert eds_addresses(eds) == {A, B}
    assert len({lds.nonce, cds.nonce, eds.nonce}) == 3

    # Every response above was ACKed. Had an ACK been answered, the next response would repeat one of them;
    # instead it is the endpoint change, and only EDS.
    write_addresses(static_file, {"default/greet": [A, B, C]})
    update = await client.recv()
    assert update.type_url == ENDPOINTS and update.version_info == "2" and update.nonce != eds.nonce
    assert eds_addresses(update) == {A, B, C}
    client.send(ENDPOINTS, [NAME], ack=update)

    # endpoints that are not ready are left out
    static_file.write_text(
        json.dumps(
            {
                "default/greet": [
                    {"ip": "10.0.0.1", "port": 8080},
                    {"ip": "10.0.0.2", "port": 8080, "ready": False},
                ]
            }
        )
    )
    update = await client.recv()
    assert update.type_url == ENDPOINTS and update.version_info == "3"
    assert eds_addresses(update) == {A}

    (stream,) = describe(srv)
    assert stream["node"] == "node-7"  # sent only on the first request, remembered for the stream
    assert stream["subscriptions"] == {"LDS": [NAME], "CDS": [NAME], "EDS": [NAME]}


async def test_nack_is_logged_and_not_answered(
    server: Callable[..., RunningServer],
    ads: Callable[..., RawAds],
    static_file: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = server()
    client = ads(srv.address, node="picky")
    await client.subscribe(LISTENER, [NAME])
    await client.subscribe(CLUSTER, [NAME])
    client.send(ENDPOINTS, [NAME])
    eds = await client.recv()
    client.send(ENDPOINTS, [NAME], nonce=eds.nonce, version="", error="no thanks")  # NACK: keeps no version
    write_addresses(static_file, {"default/greet": [C]})
    update = await client.recv()  # not a resend of the NACKed response: the next change
    assert update.type_url == ENDPOINTS and update.version_info == "2"
    assert eds_addresses(update) == {C}
    assert any(
        all(word in r.getMessage() for word in ("picky", "rejected EDS", "no thanks")) for r in caplog.records
    )
    assert describe(srv)[0]["nacks"] == 1


async def test_state_of_the_world_lists_every_existing_subscribed_name(
    server: Callable[..., RunningServer],
    ads: Callable[..., RawAds],
    static_file: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_addresses(static_file, {"default/greet": [A], "other/echo": [B]})
    srv = server()
    client = ads(srv.address)
    lds = await client.subscribe(LISTENER, [NAME])
    assert list(names_of(lds, listener_pb2.Listener)) == [NAME]
    wanted = [NAME, "echo.other", "missing.default", "Not_A-Name", "greet.default:nope"]
    lds = await client.subscribe(LISTENER, wanted)
    # every subscribed name that exists, in one response; the unknown, invalid and bad-port ones are omitted
    assert set(names_of(lds, listener_pb2.Listener)) == {NAME, "echo.other"}
    assert lds.version_info == "2"
    logged = " ".join(r.getMessage() for r in caplog.records)
    for name in ("missing.default", "Not_A-Name", "greet.default:nope"):
        assert name in logged
    # dropping a name leaves the others; only added names force an answer
    client.send(LISTENER, [NAME, "echo.other", "late.default"], ack=lds)
    lds = await client.recv()
    assert set(names_of(lds, listener_pb2.Listener)) == {NAME, "echo.other"}


async def test_unknown_target_is_served_once_it_appears(
    server: Callable[..., RunningServer], ads: Callable[..., RawAds], static_file: pathlib.Path
) -> None:
    srv = server(xds=XdsConfig(options=XdsOptions(retry_interval=0.05)))
    client = ads(srv.address)
    lds = await client.subscribe(LISTENER, ["late.default"])
    assert not lds.resources
    write_addresses(static_file, {"default/greet": [A], "default/late": [B]})
    lds = await client.recv()
    assert list(names_of(lds, listener_pb2.Listener)) == ["late.default"]


async def test_rds_mode_serves_route_configurations(
    server: Callable[..., RunningServer], ads: Callable[..., RawAds]
) -> None:
    srv = server(xds=XdsConfig(options=XdsOptions(rds=True)))
    client = ads(srv.address)
    lds = await client.subscribe(LISTENER, [NAME])
    hcm = unpack_hcm(names_of(lds, listener_pb2.Listener)[NAME])  # type: ignore[arg-type]
    assert hcm.rds.route_config_name == NAME
    rds = await client.subscribe(ROUTE, [NAME])
    assert names_of(rds, route_pb2.RouteConfiguration)[NAME] == route_configuration(NAME)


async def test_gone_target_keeps_listener_and_empties_endpoints(
    server: Callable[..., RunningServer], ads: Callable[..., RawAds], static_file: pathlib.Path
) -> None:
    write_addresses(static_file, {"default/greet": [A], "other/echo": [B]})
    srv = server()
    client = ads(srv.address)
    await client.subscribe(LISTENER, [NAME])
    await client.subscribe(CLUSTER, [NAME])
    await client.subscribe(ENDPOINTS, [NAME])
    write_addresses(static_file, {"other/echo": [B]})
    update = await client.recv()
    # not an LDS/CDS deletion: the channel fails calls UNAVAILABLE instead
    assert update.type_url == ENDPOINTS
    assert eds_addresses(update) == set()
    write_addresses(static_file, {"default/greet": [C], "other/echo": [B]})
    update = await client.recv()
    assert update.type_url == ENDPOINTS
    assert eds_addresses(update) == {C}


async def test_namespace_allow_list_applies(
    server: Callable[..., RunningServer], ads: Callable[..., RawAds], static_file: pathlib.Path
) -> None:
    write_addresses(static_file, {"default/greet": [A], "other/echo": [B]})
    srv = server(security=SecurityConfig(access=AccessConfig(namespaces=frozenset({"other"}))))
    client = ads(srv.address)
    lds = await client.subscribe(LISTENER, [NAME, "echo.other"])
    assert list(names_of(lds, listener_pb2.Listener)) == ["echo.other"]


async def test_xds_can_be_turned_off(server: Callable[..., RunningServer]) -> None:
    srv = server(xds=XdsConfig(enabled=False))
    async with grpc.aio.insecure_channel(srv.address) as channel:
        method = channel.unary_unary(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await method(b"", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_stop_ends_ads_streams_promptly(
    server: Callable[..., RunningServer], ads: Callable[..., RawAds]
) -> None:
    srv = server()  # grace 5 s: stop must not wait for it
    client = ads(srv.address)
    await client.subscribe(LISTENER, [NAME, "missing.default"])
    started = time.monotonic()
    await asyncio.to_thread(srv.stop)
    assert time.monotonic() - started < 2.0


def test_cli_flag_and_env_turn_xds_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from lookaside_server.__main__ import build_parser

    monkeypatch.delenv("LB_XDS", raising=False)
    assert build_parser().parse_args([]).xds is True
    assert build_parser().parse_args(["--no-xds"]).xds is False
    monkeypatch.setenv("LB_XDS", "0")
    assert build_parser().parse_args([]).xds is False
    assert build_parser().parse_args(["--xds"]).xds is True


def test_cli_max_names_flag_and_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lookaside_server.__main__ import build_parser
    from lookaside_server._cli.security_flags import xds_config

    monkeypatch.delenv("LB_XDS_MAX_NAMES", raising=False)
    assert xds_config(build_parser().parse_args([])) == XdsConfig(enabled=True)  # the default: 256
    config = xds_config(build_parser().parse_args(["--xds-max-names", "1000"]))
    assert config.options is not None and config.options.max_names == 1000
    monkeypatch.setenv("LB_XDS_MAX_NAMES", "40")
    config = xds_config(build_parser().parse_args([]))
    assert config.options is not None and config.options.max_names == 40
    for bad in ("0", "abc"):
        monkeypatch.setenv("LB_XDS_MAX_NAMES", bad)
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([])
        assert e.value.code == 2 and "LB_XDS_MAX_NAMES" in capsys.readouterr().err


def test_bootstrap_example_is_valid() -> None:
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "xds" / "bootstrap.json"
    data = json.loads(path.read_text())
    (server,) = data["xds_servers"]
    assert server["server_uri"] == "lookaside.default.svc:50055"
    assert server["channel_creds"] == [{"type": "insecure"}] and server["server_features"] == ["xds_v3"]
    assert data["node"]["id"]


async def test_source_errors_do_not_end_the_stream(
    server: Callable[..., RunningServer], ads: Callable[..., RawAds]
) -> None:
    srv = server(xds=XdsConfig(options=XdsOptions(retry_interval=0.05)))
    source = srv.server.source
    real = source.subscribe
    failures = []

    async def flaky(target: Target) -> None:
        if target.service == "flaky" and len(failures) < 2:
            failures.append(target)
            raise RuntimeError("source unavailable")
        await real(target)

    source.subscribe = flaky  # type: ignore[method-assign]
    client = ads(srv.address)
    lds = await client.subscribe(LISTENER, [NAME, "flaky.default"])
    assert list(names_of(lds, listener_pb2.Listener)) == [NAME]
    assert failures


# --- spellings, sharing, limits and rejects ---------------------------------------------------------------


def cache_of(srv: RunningServer) -> dict[str, object]:
    async def get() -> dict[str, object]:
        xds = srv.server.xds  # type: ignore[attr-defined]
        return {"entries": len(xds.cache), "builds": dict(xds.cache.builds), "rejects": dict(xds.rejects)}

    return asyncio.run_coroutine_threadsafe(get(), srv._loop).result(5)


def listener_clusters(response: discovery_pb2.DiscoveryResponse) -> dict[str, str]:
    return {
        name: unpack_hcm(lis).route_config.virtual_hosts[0].routes[0].route.cluster  # type: ignore[arg-type]
        for name, lis in names_of(response, listener_pb2.Listener).items()
    }


async def test_every_spelling_gets_its_listener_and_shares_the_canonical_resources(
    server: Callable[..., RunningServer],
    ads: Callable[..., RawAds],
    static_file: pathlib.Path,
) -> None:
    srv = server()
    canonical = "greet.default:8080"
    spellings = [canonical, "greet.default.svc:08080", "greet.default.svc.cluster.local:8080"]
    clients = [ads(srv.address, node=f"n{i}") for i in range(2)]
    for client in clients:
        lds = await client.subscribe(LISTENER, spellings)
        # the Listener under each name the client dialled, each routing to the one canonical cluster
        assert listener_clusters(lds) == dict.fromkeys(spellings, canonical)
        cds = await client.subscribe(CLUSTER, [canonical])
        assert list(names_of(cds, cluster_pb2.Cluster)) == [canonical]
        # the server names EDS canonically: another spelling gets nothing (and is counted)
        eds = await client.subscribe(ENDPOINTS, [canonical, "greet.default.svc:8080"])
        assert list(names_of(eds, endpoint_pb2.ClusterLoadAssignment)) == [canonical]
        assert eds_addresses(eds, canonical) == {A, B}
    state = cache_of(srv)
    # one canonical entry, each resource encoded once for both streams
    assert state["entries"] == 1 and state["builds"] == {CLUSTER: 1, ENDPOINTS: 1}, state
    assert state["rejects"] == {"unknown_name": 2}, state
    write_addresses(static_file, {"default/greet": [A, B, C]})
    for client in clients:
        update = await client.recv()
        assert update.type_url == ENDPOINTS and eds_addresses(update, canonical) == {A, B, C}
    assert cache_of(srv)["builds"] == {CLUSTER: 1, ENDPOINTS: 2}
    for client in clients:
        await client.close()
    deadline = time.monotonic() + 10
    while cache_of(srv)["entries"] and time.monotonic() < deadline:  # released with the last stream
        await asyncio.sleep(0.02)
    assert cache_of(srv)["entries"] == 0


async def test_more_names_than_the_limit_end_the_stream(
    server: Callable[..., RunningServer], ads: Callable[..., RawAds]
) -> None:
    srv = server(xds=XdsConfig(options=XdsOptions(max_names=3)))
    client = ads(srv.address)
    await client.subscribe(LISTENER, [NAME, "greet.default.svc"])
    client.send(CLUSTER, [NAME, "greet.default:80", "echo.default"])  # 4 distinct names on the stream
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.recv()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--xds-max-names" in (e.value.details() or "") and "at most 3" in (e.value.details() or "")
    assert cache_of(srv)["rejects"] == {"too_many_names": 1}


async def test_undecodable_request_ends_the_stream_invalid_argument(
    server: Callable[..., RunningServer],
) -> None:
    srv = server()
    async with grpc.aio.insecure_channel(srv.address) as channel:
        method = channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
        )
        call = method(iter([b"\xff\xff\xff"]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call:
                pass
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DiscoveryRequest" in (e.value.details() or "")


async def test_rejects_are_counted_in_metrics_and_logged_rate_limited(
    server: Callable[..., RunningServer],
    ads: Callable[..., RawAds],
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = server(http=HttpConfig(port=0, host="127.0.0.1"))
    client = ads(srv.address)
    await client.subscribe(ENDPOINTS, [NAME])
    for i in range(20):
        client.send("type.googleapis.com/no.Such", [NAME])
        client.send(ENDPOINTS, [NAME], nonce=str(i), error=f"bad {i}")
    client.send(LISTENER, [NAME])
    await client.recv()  # answered after the 40 rejected requests: they were all handled
    assert cache_of(srv)["rejects"] == {"unknown_type": 20, "nack": 20}

    def scrape() -> str:
        port = srv.server.http_port  # type: ignore[attr-defined]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    text = await asyncio.to_thread(scrape)
    assert 'lookaside_xds_rejects_total{reason="unknown_type"} 20.0' in text
    assert 'lookaside_xds_rejects_total{reason="nack"} 20.0' in text
    logged = [r.getMessage() for r in caplog.records if r.name == "lookaside_server._xds.stream"]
    assert sum("unsupported type" in m for m in logged) == 5  # 5 per client IP and reason per 30 s
    assert sum("rejected EDS" in m for m in logged) == 5
