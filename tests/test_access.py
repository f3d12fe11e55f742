"""Access control: per-namespace service rules and the namespace allow-list through one policy, for Resolve,
Watch, Status, ReportLoad and xDS; denials are PERMISSION_DENIED naming the flag, and counted."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from prometheus_client.parser import text_string_to_metric_families

from lookaside_dev.server_helpers import endpoints
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb
from lookaside_grpc._generated import lookaside_pb2 as pb2
from lookaside_server import (
    AccessConfig,
    HttpConfig,
    ListenConfig,
    LookasideServer,
    SecurityConfig,
    ServerConfig,
    StaticFileConfig,
)
from lookaside_server._cli.flags import build_parser, server_config
from lookaside_server._cli.security_flags import limits_config, security_config
from lookaside_server._core.model import Target
from lookaside_server._security.access import AccessPolicy, parse_identities, parse_service_rules

DATA = {
    "default/greet": endpoints(1),
    "default/echo": endpoints(1, 50061),
    "team-a/api": endpoints(1, 50071),
    "team-b/db": endpoints(1, 50081),
}
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


def allow(**access: Any) -> SecurityConfig:
    """Security settings with only access rules (AccessConfig fields)."""
    return SecurityConfig(access=AccessConfig(**access))


@asynccontextmanager
async def served(tmp_path: Path, **config: Any) -> AsyncIterator[tuple[LookasideServer, grpc.aio.Channel]]:
    path = tmp_path / "endpoints.json"
    write_static(path, DATA)
    server = LookasideServer(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5),
            source=StaticFileConfig(str(path)),
            http=HttpConfig(port=0, host="127.0.0.1"),
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


async def scrape(server: LookasideServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The /metrics samples of ``server``, over HTTP, off the loop: (name, sorted labels) -> value."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    text = await asyncio.to_thread(get)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_parse_rules() -> None:
    assert parse_service_rules(["default/greet,default/echo", " team-a/* "]) == {
        "default": frozenset({"greet", "echo"}),
        "team-a": frozenset({"*"}),
    }
    assert parse_service_rules(None) == {}
    for bad in ("greet", "Default/greet", "default/Greet", "default/"):
        with pytest.raises(ValueError, match="--allow-service"):
            parse_service_rules([bad])
    assert parse_identities(["spiffe://a/*, *.svc", ""]) == ("spiffe://a/*", "*.svc")
    assert parse_identities([]) is None


def test_policy_decisions() -> None:
    reasons: list[str] = []
    policy = AccessPolicy(
        frozenset({"default", "team-a", "team-b"}),
        parse_service_rules(["default/greet", "team-a/*"]),
        on_deny=reasons.append,
    )
    assert policy.target_denial(Target("greet", "default")) is None
    assert policy.target_denial(Target("anything", "team-a")) is None
    assert policy.target_denial(Target("db", "team-b")) is None  # no rules for team-b: the whole namespace
    denial = policy.target_denial(Target("echo", "default"))
    assert denial is not None and denial.reason == "service" and "--allow-service" in denial.message
    denial = policy.target_denial(Target("dns", "kube-system"))
    assert denial is not None and denial.reason == "namespace" and "--allow-namespace" in denial.message
    assert reasons == ["service", "namespace"]
    assert policy.identity_allowed(["anything"])  # no identity rule
    strict = AccessPolicy(client_identities=("spiffe://cluster.local/ns/*/sa/web", "*.tools.svc"))
    assert strict.identity_allowed(["spiffe://cluster.local/ns/shop/sa/web"])
    assert strict.identity_allowed(["x", "ops.tools.svc"])
    assert not strict.identity_allowed(["spiffe://cluster.local/ns/shop/sa/db"])
    assert not strict.identity_allowed([])


async def test_service_rules_for_every_rpc_and_counted(tmp_path: Path) -> None:
    rules = parse_service_rules(["default/greet"])
    async with served(tmp_path, security=allow(services=rules)) as (server, channel):
        stub = pb.LookasideStub(channel)
        ok = await stub.Resolve(pb.Request(service="greet", namespace="default"), timeout=5)
        assert ok.port == 50051
        # namespaces without rules are unaffected
        assert (await stub.Resolve(pb.Request(service="api", namespace="team-a"), timeout=5)).port == 50071

        async def denied(call: Any) -> str:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            return e.value.details() or ""

        msg = await denied(stub.Resolve(pb.Request(service="echo", namespace="default"), timeout=5))
        assert "'default/echo'" in msg and "--allow-service" in msg and "greet" in msg
        watch = stub.Watch(pb.WatchRequest(service="echo", namespace="default"), timeout=5)
        await denied(watch.read())
        status = channel.unary_unary(
            "/lookaside.Lookaside/Status", pb2.StatusRequest.SerializeToString, pb2.StatusResponse.FromString
        )
        await denied(status(pb2.StatusRequest(service="echo", namespace="default"), timeout=5))
        await denied(
            stub.ReportLoad(pb.LoadReport(service="echo", namespace="default", client_id="c1"), timeout=5)
        )
        samples = await scrape(server)
        assert samples[("lookaside_access_denied_total", (("reason", "service"),))] == 4
        assert samples[("lookaside_access_denied_total", (("reason", "namespace"),))] == 0
        key = (
            "lookaside_rpcs_total",
            (
                ("grpc_code", "PERMISSION_DENIED"),
                ("grpc_method", "Resolve"),
                ("grpc_service", "lookaside.Lookaside"),
            ),
        )
        assert samples[key] == 1


async def test_namespace_allow_list_through_the_policy(tmp_path: Path) -> None:
    async with served(tmp_path, security=allow(namespaces=frozenset({"default"}))) as (server, channel):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb.LookasideStub(channel).Resolve(pb.Request(service="api", namespace="team-a"), timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "--allow-namespace" in (e.value.details() or "")
        assert (await scrape(server))[("lookaside_access_denied_total", (("reason", "namespace"),))] == 1


async def test_xds_omits_denied_names_and_counts_them(tmp_path: Path) -> None:
    rules = parse_service_rules(["default/greet"])
    async with served(tmp_path, security=allow(services=rules)) as (server, channel):
        queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while (r := await queue.get()) is not None:
                yield r

        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(requests())
        queue.put_nowait(
            discovery_pb2.DiscoveryRequest(
                type_url=LISTENER, resource_names=["greet.default", "echo.default"]
            )
        )
        response = await asyncio.wait_for(call.read(), 10)
        assert response.type_url == LISTENER and len(response.resources) == 1  # only greet.default
        queue.put_nowait(None)
        call.cancel()
        assert (await scrape(server))[("lookaside_access_denied_total", (("reason", "service"),))] == 1


def test_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        [
            "--static-file",
            "x",
            "--allow-service",
            "default/greet",
            "--allow-service",
            "team-a/*",
            "--max-watches",
            "7",
        ]
    )
    got = security_config(args)
    assert got.access.services == {"default": frozenset({"greet"}), "team-a": frozenset({"*"})}
    assert limits_config(args).max_watches == 7 and got.tls is None and got.access.client_identities is None
    monkeypatch.setenv("LB_ALLOW_SERVICES", "ns/a,ns/b")
    monkeypatch.setenv("LB_MAX_WATCHES_PER_PEER", "3")
    monkeypatch.setenv("LB_LOG_FORMAT", "json")
    args = build_parser().parse_args(["--static-file", "x"])
    got = security_config(args)
    assert got.access.services == {"ns": frozenset({"a", "b"})}
    assert limits_config(args).max_watches_per_peer == 3
    assert args.log_format == "json"
    config = server_config(args)
    assert config.security.access.services == got.access.services and config.limits.max_watches_per_peer == 3
    args = build_parser().parse_args(["--static-file", "x", "--allow-client-identity", "spiffe://x/*"])
    with pytest.raises(ValueError, match="mutual TLS"):
        security_config(args)
