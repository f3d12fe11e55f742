"""Server assembly: health, reflection, run_in_thread, the CLI (SIGTERM, exit codes), wire compatibility."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lookaside_dev.server_helpers import endpoints, serve
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb
from lookaside_server import ListenConfig, ServerConfig, StaticFileConfig, run_in_thread

T = "default/greet"


async def test_health_serving(tmp_path: Path) -> None:
    async with serve(tmp_path, {T: endpoints(1)}) as s:
        stub = health_pb2_grpc.HealthStub(s.channel)
        for service in ("", "lookaside.Lookaside"):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        await s.server.stop(1.0)
        assert (
            await s.server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        ).status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_services(tmp_path: Path) -> None:
    async with serve(tmp_path, {T: endpoints(1)}) as s:
        stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = set()
        async for resp in call:
            names = {svc.name for svc in resp.list_services_response.service}
            break
        call.cancel()
        assert {
            "lookaside.Lookaside",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names


async def test_reflection_describes_the_lookaside_service(tmp_path: Path) -> None:
    """``grpcurl describe lookaside.Lookaside``: the file holding the service is served by reflection."""
    async with serve(tmp_path, {T: endpoints(1)}) as s:
        stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="lookaside.Lookaside")
        call = stub.ServerReflectionInfo(iter([request]))
        resp = await call.read()
        call.cancel()
        assert not resp.HasField("error_response"), resp.error_response.error_message
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in resp.file_descriptor_response.file_descriptor_proto
        ]
        (lookaside,) = [f for f in files if any(svc.name == "Lookaside" for svc in f.service)]
        assert lookaside.package == "lookaside"
        assert {m.name for m in lookaside.service[0].method} >= {"Resolve", "Watch", "Status", "ReportLoad"}


def test_run_in_thread(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    write_static(path, {T: endpoints(2)})
    running = run_in_thread(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0),
            source=StaticFileConfig(path, poll_interval=0.05),
        )
    )
    try:
        assert running.address == f"127.0.0.1:{running.port}"
        with grpc.insecure_channel(running.address) as ch:
            stub = pb.LookasideStub(ch)
            got = [
                stub.Resolve(
                    pb.Request(router=pb.ROUNDROBIN, service="greet", namespace="default"), timeout=10
                ).port
                for _ in range(4)
            ]
        assert got == [50051, 50052, 50051, 50052]
    finally:
        running.stop()
    assert not running._thread.is_alive()
    with pytest.raises(Exception, match="cannot read"):
        run_in_thread(
            ServerConfig(
                listen=ListenConfig(host="127.0.0.1", port=0),
                source=StaticFileConfig(tmp_path / "missing.yaml"),
            )
        )


def _legacy_stub(channel: grpc.Channel) -> tuple[type, grpc.UnaryUnaryMultiCallable]:
    """A client built only from the ORIGINAL lookaside.proto: 3-field Request, 1-field Response."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="legacy/lookaside.proto", package="lookaside", syntax="proto3"
    )
    req = fdp.message_type.add(name="Request")
    enum = req.enum_type.add(name="RouterType")
    enum.value.add(name="RANDOM", number=0)
    enum.value.add(name="ROUNDROBIN", number=1)
    f = descriptor_pb2.FieldDescriptorProto
    req.field.add(
        name="router",
        number=1,
        type=f.TYPE_ENUM,
        type_name=".lookaside.Request.RouterType",
        label=f.LABEL_OPTIONAL,
    )
    req.field.add(name="service", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    req.field.add(name="namespace", number=3, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    resp = fdp.message_type.add(name="Response")
    resp.field.add(name="address", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    request_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("lookaside.Request"))
    response_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("lookaside.Response"))
    call = channel.unary_unary(
        "/lookaside.Lookaside/Resolve",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    return request_cls, call


def test_wire_compatible_with_original_client(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    write_static(path, {T: [{"ip": f"10.0.0.{i}", "port": 50051} for i in (1, 2, 3)]})
    with run_in_thread(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0),
            source=StaticFileConfig(path),
        )
    ) as running:
        with grpc.insecure_channel(running.address) as ch:
            request_cls, resolve = _legacy_stub(ch)
            req = request_cls(router=1, service="greet", namespace="default")
            got = [resolve(req, timeout=10).address for _ in range(6)]
            assert got == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2
            # the original default router (RANDOM = 0) still answers with a bare IP
            assert resolve(request_cls(service="greet", namespace="default"), timeout=10).address in got


def _start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lookaside_server", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _bound_port(proc: subprocess.Popen[str], timeout: float = 15.0) -> int:
    """Read the subprocess log until it says where it listens (bounded by ``timeout``)."""
    found: list[int] = []
    lines: list[str] = []

    def scan() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                found.append(int(m.group(1)))
                return

    reader = threading.Thread(target=scan, daemon=True)
    reader.start()
    reader.join(timeout)
    assert found, f"no 'listening on' line: {''.join(lines)}"
    return found[0]


def test_cli_sigterm_with_open_watch(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    write_static(path, {T: endpoints(2)})
    proc = _start_cli(
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--grace",
        "5",
        env={"LB_STATIC_FILE": str(path), "LB_LOG_LEVEL": "INFO"},
    )
    try:
        port = _bound_port(proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            request = pb.WatchRequest(service="greet", namespace="default")
            stream = pb.LookasideStub(ch).Watch(request, timeout=15)
            first = next(stream)
            assert [e.port for e in first.endpoints] == [50051, 50052]
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            assert time.monotonic() - started < 4.0  # not held for the 5 s grace by the open stream
            assert list(stream) == []  # the stream ended cleanly
            assert stream.code() == grpc.StatusCode.OK
        out, _ = proc.communicate(timeout=5)
        assert out == ""  # nothing printed: logging only, to stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_cli_without_source_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LB_STATIC_FILE"}
    proc = subprocess.run(
        [sys.executable, "-m", "lookaside_server", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 2
    assert "--static-file" in proc.stderr


def test_cli_missing_file_exits_1(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lookaside_server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--static-file",
            str(tmp_path / "missing.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "missing.yaml" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(
    ("env", "flag"),
    [
        ({"LB_PORT": "abc"}, "--port"),
        ({"LB_PORT": "70000"}, "--port"),
        ({"LB_POLL_INTERVAL": "x"}, "--poll-interval"),
        ({"LB_POLL_INTERVAL": "0"}, "--poll-interval"),
        ({"LB_MAX_WATCHES": "many"}, "--max-watches"),
        ({"LB_GRACE": "-1"}, "--grace"),
        ({"LB_SOURCE": "bogus"}, "--source"),
        ({"LB_LOG_LEVEL": "loud"}, "--log-level"),
        ({"LB_HTTP_PORT": "http"}, "--http-port"),
    ],
)
def test_bad_env_values_are_usage_errors(tmp_path: Path, env: dict[str, str], flag: str) -> None:
    """A bad LB_* value is a usage error naming the flag and the variable (exit 2), never a traceback;
    ``--help`` still works with it set."""
    path = tmp_path / "e.json"
    write_static(path, {T: endpoints(1)})
    full_env = {**os.environ, **env}
    proc = subprocess.run(
        [sys.executable, "-m", "lookaside_server", "--static-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
    )
    assert proc.returncode == 2, proc.stderr
    (name,) = env
    assert f"argument {flag}" in proc.stderr and f"(from {name})" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("usage:")
    if name == "LB_PORT":
        helped = subprocess.run(
            [sys.executable, "-m", "lookaside_server", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=full_env,
        )
        assert helped.returncode == 0 and name in helped.stdout and "Traceback" not in helped.stderr
