"""/metrics on the HTTP listener (a registry per server) and structured JSON logs with target and peer."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lookaside_dev.server_helpers import endpoints, wait_until
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb
from lookaside_server import (
    AccessConfig,
    HttpConfig,
    ListenConfig,
    LookasideServer,
    SecurityConfig,
    ServerConfig,
    StaticFileConfig,
    StaticFileSource,
    Target,
)
from lookaside_server._web.logging import make_handler

T = "default/greet"
GREET = pb.Request(router=pb.ROUNDROBIN, service="greet", namespace="default")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class DescribedSource(StaticFileSource):
    """A static source reporting Kubernetes-like watch health per target."""

    def describe(self, target: Target) -> dict[str, str | int | float]:
        return {"restarts": 3, "errors": 2, "last_error": "boom"}


def allow(**access: Any) -> SecurityConfig:
    """Security settings with only access rules (AccessConfig fields)."""
    return SecurityConfig(access=AccessConfig(**access))


@asynccontextmanager
async def served(
    tmp_path: Path, data: Any = None, **config: Any
) -> AsyncIterator[tuple[LookasideServer, grpc.aio.Channel]]:
    path = tmp_path / "endpoints.json"
    write_static(path, data or {T: endpoints(2, ready=True), "default/echo": endpoints(1, 50061)})
    if config.pop("described", False):
        config["source"] = DescribedSource(path, poll_interval=0.05)
    server = LookasideServer(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5),
            source=config.pop("source", StaticFileConfig(str(path))),
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


async def scrape(server: LookasideServer) -> tuple[str, Samples]:
    """GET /metrics (from a thread: the scrape reads the registry on the server's loop)."""

    def get() -> tuple[str, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10) as resp:
            return resp.headers["Content-Type"], resp.read().decode()

    content_type, text = await asyncio.to_thread(get)
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    return text, samples


def rpc(method: str, code: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (
        "lookaside_rpcs_total",
        (("grpc_code", code), ("grpc_method", method), ("grpc_service", "lookaside.Lookaside")),
    )


async def test_metrics_after_some_calls(tmp_path: Path) -> None:
    async with served(tmp_path, described=True) as (server, channel):
        stub = pb.LookasideStub(channel)
        for _ in range(3):
            await stub.Resolve(GREET, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Resolve(pb.Request(service="nope", namespace="default"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Resolve(pb.Request(service="Bad!", namespace="default"), timeout=5)
        watch = stub.Watch(pb.WatchRequest(service="echo", namespace="default"), timeout=30)
        await asyncio.wait_for(watch.read(), 10)

        text, samples = await scrape(server)
        assert samples[rpc("Resolve", "OK")] == 3
        assert samples[rpc("Resolve", "NOT_FOUND")] == 1
        assert samples[rpc("Resolve", "INVALID_ARGUMENT")] == 1
        hist = (
            "lookaside_rpc_duration_seconds_count",
            (("grpc_method", "Resolve"), ("grpc_service", "lookaside.Lookaside")),
        )
        assert samples[hist] == 5
        assert 0 < samples[(hist[0].replace("_count", "_sum"), hist[1])] < 5
        assert samples[("lookaside_streams", (("kind", "watch"),))] == 1
        assert samples[("lookaside_streams", (("kind", "xds"),))] == 0
        assert samples[("lookaside_targets", ())] == 2
        assert samples[("lookaside_target_endpoints", (("target", "greet.default"),))] == 2
        assert samples[("lookaside_target_ready_endpoints", (("target", "greet.default"),))] == 2
        assert samples[("lookaside_target_watchers", (("target", "echo.default"),))] == 1
        assert samples[("lookaside_target_version", (("target", "echo.default"),))] == 1
        assert samples[("lookaside_kubernetes_watch_restarts_total", (("target", "greet.default"),))] == 3
        assert samples[("lookaside_kubernetes_watch_errors_total", (("target", "echo.default"),))] == 2
        for name in (
            "lookaside_access_denied_total",
            "lookaside_limit_hits_total",
            "python_info",
            "process_cpu_seconds_total",
            "python_gc_objects_collected_total",
        ):
            assert name in text

        # The Watch ends: its stream and watcher series drop back; then the target is forgotten.
        watch.cancel()

        async def watch_gone() -> bool:
            return server.slots.total == 0

        await wait_until(watch_gone, what="the Watch stream to end")
        _, samples = await scrape(server)
        assert samples[("lookaside_streams", (("kind", "watch"),))] == 0
        assert samples[rpc("Watch", "CANCELLED")] == 1
        await server.registry.expire_idle(0.0)
        _, samples = await scrape(server)
        assert samples[("lookaside_targets", ())] == 0
        assert not [k for k in samples if k[0] == "lookaside_target_endpoints"]  # series removed


def std(name: str, grpc_type: str, service: str, method: str, code: str | None = None) -> tuple[str, Any]:
    """A sample key of a standard gRPC server series (go-grpc-prometheus's names and labels)."""
    labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method}
    if code is not None:
        labels["grpc_code"] = code
    return name, tuple(sorted(labels.items()))


UPLOAD = "test.Upload"


class WithClientStream(LookasideServer):
    """The lookaside server plus a client-streaming method (the lookaside API has none), served through the
    same interceptor: it counts the raw request messages, answering FAILED_PRECONDITION for none."""

    def _add_xds(self, server: grpc.aio.Server, load: Any = None) -> tuple[str, ...]:
        async def count(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            n = 0
            async for _ in requests:
                n += 1
            if n == 0:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nothing sent")
            return str(n).encode()

        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    UPLOAD, {"Count": grpc.stream_unary_rpc_method_handler(count)}
                ),
            )
        )
        return super()._add_xds(server, load)


async def test_standard_grpc_server_metrics(tmp_path: Path) -> None:
    """grpc_server_started_total / handled_total / handling_seconds / msg_received_total / msg_sent_total with
    grpc_type, grpc_service, grpc_method (and grpc_code in grpc-go's spelling) after real calls of every type;
    long-lived streams count as started when they start and as handled only when they end."""
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from lookaside_server._web.metrics import XDS_MAX_NAMES
    from lookaside_server._xds.resources import LISTENER
    from lookaside_server._xds.stream import MAX_NAMES_LIMIT

    assert XDS_MAX_NAMES == MAX_NAMES_LIMIT  # the label shown at 0 from the start is the one counted

    path = tmp_path / "endpoints.json"
    write_static(path, {T: endpoints(2, ready=True)})
    server = WithClientStream(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5),
            source=StaticFileConfig(str(path)),
            http=HttpConfig(port=0, host="127.0.0.1"),
        )
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    lk = "lookaside.Lookaside"
    try:
        stub = pb.LookasideStub(channel)
        # unary: two OK, one NOT_FOUND
        for _ in range(2):
            await stub.Resolve(GREET, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Resolve(pb.Request(service="nope", namespace="default"), timeout=5)
        # client stream: three messages (OK), then none (FAILED_PRECONDITION)
        upload = channel.stream_unary(f"/{UPLOAD}/Count")
        assert await upload(iter([b"a", b"b", b"c"]), timeout=5) == b"3"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await upload(iter([]), timeout=5)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # bidi stream that ends: two reflection requests, two answers, OK
        refl = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")] * 2), timeout=5
        )
        assert len([r async for r in refl]) == 2
        # long-lived streams: a Watch (server stream) and an xDS stream (bidi), both still open
        watch = stub.Watch(pb.WatchRequest(service="greet", namespace="default"), timeout=30)
        await asyncio.wait_for(watch.read(), 10)
        ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(timeout=30)
        await ads.write(discovery_pb2.DiscoveryRequest(type_url=LISTENER, resource_names=["greet.default"]))
        assert (await asyncio.wait_for(ads.read(), 10)).type_url == LISTENER

        text, samples = await scrape(server)
        for name in (
            "started_total",
            "handled_total",
            "handling_seconds",
            "msg_received_total",
            "msg_sent_total",
        ):
            assert f"# TYPE grpc_server_{name} " in text
        assert samples[std("grpc_server_started_total", "unary", lk, "Resolve")] == 3
        assert samples[std("grpc_server_handled_total", "unary", lk, "Resolve", "OK")] == 2
        assert samples[std("grpc_server_handled_total", "unary", lk, "Resolve", "NotFound")] == 1
        assert samples[std("grpc_server_msg_received_total", "unary", lk, "Resolve")] == 3
        assert samples[std("grpc_server_msg_sent_total", "unary", lk, "Resolve")] == 2
        assert samples[std("grpc_server_handling_seconds_count", "unary", lk, "Resolve")] == 3
        bucket = std("grpc_server_handling_seconds_bucket", "unary", lk, "Resolve")
        assert samples[(bucket[0], tuple(sorted((*bucket[1], ("le", "+Inf")))))] == 3

        assert samples[std("grpc_server_started_total", "client_stream", UPLOAD, "Count")] == 2
        assert samples[std("grpc_server_handled_total", "client_stream", UPLOAD, "Count", "OK")] == 1
        assert (
            samples[std("grpc_server_handled_total", "client_stream", UPLOAD, "Count", "FailedPrecondition")]
            == 1
        )
        assert samples[std("grpc_server_msg_received_total", "client_stream", UPLOAD, "Count")] == 3
        assert samples[std("grpc_server_msg_sent_total", "client_stream", UPLOAD, "Count")] == 1

        rs, rm = "grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo"
        assert samples[std("grpc_server_handled_total", "bidi_stream", rs, rm, "OK")] == 1
        assert samples[std("grpc_server_msg_received_total", "bidi_stream", rs, rm)] == 2
        assert samples[std("grpc_server_msg_sent_total", "bidi_stream", rs, rm)] == 2

        xs, xm = "envoy.service.discovery.v3.AggregatedDiscoveryService", "StreamAggregatedResources"
        for grpc_type, service, method in (("server_stream", lk, "Watch"), ("bidi_stream", xs, xm)):
            assert samples[std("grpc_server_started_total", grpc_type, service, method)] == 1
            assert samples[std("grpc_server_msg_received_total", grpc_type, service, method)] == 1
            assert samples[std("grpc_server_msg_sent_total", grpc_type, service, method)] >= 1
            assert not [
                k for k in samples if k[0] == "grpc_server_handled_total" and ("grpc_method", method) in k[1]
            ]
        # the lookaside series stay as they were
        assert samples[rpc("Resolve", "NOT_FOUND")] == 1

        watch.cancel()
        ads.cancel()

        async def streams_ended() -> bool:
            return server.slots.total == 0

        await wait_until(streams_ended, what="the streams to end")

        async def handled() -> bool:
            _, samples = await scrape(server)
            keys = [
                std("grpc_server_handled_total", t, s, m, "Canceled")
                for t, s, m in (("server_stream", lk, "Watch"), ("bidi_stream", xs, xm))
            ]
            return all(samples.get(k) == 1 for k in keys)

        await wait_until(handled, what="the streams to count as handled (Canceled)")
        _, samples = await scrape(server)
        assert samples[std("grpc_server_handling_seconds_count", "server_stream", lk, "Watch")] == 1
        assert samples[rpc("Watch", "CANCELLED")] == 1
    finally:
        await channel.close()
        await server.stop(0.5)


async def test_metrics_exposition_negotiated_and_compressed(tmp_path: Path) -> None:
    """prometheus-client's own exposition: OpenMetrics by Accept, gzip by Accept-Encoding, name[] filters."""
    async with served(tmp_path) as (server, channel):
        await pb.LookasideStub(channel).Resolve(GREET, timeout=5)

        def get(path: str, **headers: str) -> tuple[dict[str, str], bytes]:
            req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", headers=headers)
            with urllib.request.urlopen(req, timeout=10) as resp:
                return dict(resp.headers), resp.read()

        headers, body = await asyncio.to_thread(
            get, "/metrics", Accept="application/openmetrics-text; version=1.0.0; charset=utf-8"
        )
        assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert body.endswith(b"# EOF\n") and b"lookaside_rpcs_total" in body
        headers, body = await asyncio.to_thread(get, "/metrics", **{"Accept-Encoding": "gzip"})
        assert headers["Content-Encoding"] == "gzip" and "Accept-Encoding" in headers["Vary"]
        text = gzip.decompress(body).decode()
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'lookaside_limit_hits_total{limit="http_max_connections"} 0.0' in text
        assert 'lookaside_limit_hits_total{limit="http_header_timeout"} 0.0' in text
        for limit in ("xds_max_names", "max_load_reports_per_peer", "max_load_report_endpoints"):
            assert f'lookaside_limit_hits_total{{limit="{limit}"}} 0.0' in text
        assert "lookaside_http_connections 1.0" in text  # this scrape's own connection
        _, body = await asyncio.to_thread(get, "/metrics?name[]=lookaside_targets")
        assert [line for line in body.decode().splitlines() if not line.startswith("#")] == [
            "lookaside_targets 1.0"
        ]


async def test_two_servers_in_one_process_have_their_own_metrics(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with served(tmp_path / "a") as (a, ch_a), served(tmp_path / "b") as (b, _ch_b):
        await pb.LookasideStub(ch_a).Resolve(GREET, timeout=5)
        _, sa = await scrape(a)
        _, sb = await scrape(b)
        assert sa[rpc("Resolve", "OK")] == 1 and rpc("Resolve", "OK") not in sb
        assert sa[("lookaside_targets", ())] == 1 and sb[("lookaside_targets", ())] == 0


async def test_unknown_methods_are_not_counted(tmp_path: Path) -> None:
    async with served(tmp_path) as (server, channel):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await channel.unary_unary("/no.Such/Method")(b"", timeout=5)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        _, samples = await scrape(server)
        counted = [k for k in samples if k[0] == "lookaside_rpcs_total" and ("grpc_method", "Method") in k[1]]
        assert not counted


async def test_json_logs_carry_target_and_peer(tmp_path: Path) -> None:
    stream = io.StringIO()
    handler = make_handler("json", stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        async with served(tmp_path, security=allow(namespaces=frozenset({"default"}))) as (_server, channel):
            with pytest.raises(grpc.aio.AioRpcError):
                await pb.LookasideStub(channel).Resolve(
                    pb.Request(service="api", namespace="team-a"), timeout=5
                )
            await pb.LookasideStub(channel).Resolve(GREET, timeout=5)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(rec) for rec in lines)
    denied = [r for r in lines if r["message"].startswith("access denied")]
    assert len(denied) == 1
    assert denied[0]["target"] == "api.team-a" and denied[0]["peer"].startswith("ipv4:127.0.0.1:")
    assert denied[0]["level"] == "WARNING" and denied[0]["logger"] == "lookaside_server._security.access"
    subscribed = [r for r in lines if r["message"] == "subscribed target greet.default"]
    assert subscribed and subscribed[0]["target"] == "greet.default" and "peer" in subscribed[0]
    started = [r for r in lines if r["message"].startswith("listening on")]
    assert started and "target" not in started[0] and "peer" not in started[0]


def test_cli_log_format_json(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    write_static(path, {T: endpoints(1)})
    env = {**os.environ, "LB_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lookaside_server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "-1",
            "--static-file",
            str(path),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        lines = []
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(json.loads(line))
            if lines[-1]["message"].startswith("listening on"):
                break
        assert lines and lines[-1]["message"].startswith("listening on 127.0.0.1:")
        port = int(lines[-1]["message"].split()[2].rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # answered: the SIGTERM handler is installed
            assert pb.LookasideStub(ch).Resolve(GREET, timeout=10).port == 50051
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    for line in (rest or "").splitlines():
        assert json.loads(line)["logger"]
