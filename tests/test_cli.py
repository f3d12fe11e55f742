"""The `lookaside` operator CLI against a real lookaside server: resolve, watch, status, exit codes; it needs
only the client package, and `lookaside-server` without the server extra says what to install."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from lookaside_dev.backends import Backend
from lookaside_dev.client_only import hide_modules_code
from lookaside_dev.static_files import write_addresses
from lookaside_grpc._cli import (
    EXIT_DEADLINE,
    EXIT_INVALID_ARGUMENT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PERMISSION_DENIED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    parse_target,
)
from lookaside_grpc.protocol import Target
from lookaside_server import (
    AccessConfig,
    ListenConfig,
    RunningServer,
    SecurityConfig,
    ServerConfig,
    StaticFileConfig,
    run_in_thread,
)

TARGET = "default/greet"  # the static file's key
CLI = [sys.executable, "-m", "lookaside_grpc"]


def without_server_extra(code: str, *also: str) -> list[str]:
    """``python -c code`` in a process where importing any server dependency (and ``also``) fails, as after a
    client-only ``pip install lookaside-grpc`` (``sys.modules[name] = None`` makes ``import name`` raise)."""
    return [sys.executable, "-c", hide_modules_code(*also) + code]


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def static_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "endpoints.yaml"


@pytest.fixture
def server(
    static_file: pathlib.Path, backends: Callable[..., Backend]
) -> Iterator[tuple[RunningServer, list]]:
    group = [backends(), backends()]
    write_addresses(static_file, {TARGET: [b.address for b in group]}, port_name="grpc", zone="zone-a")
    with run_in_thread(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0),
            source=StaticFileConfig(static_file, poll_interval=0.02),
        )
    ) as s:
        yield s, group


def test_parse_target_is_the_one_target_grammar() -> None:
    assert (
        parse_target("greet.default")
        == parse_target("greet.default.svc.cluster.local")
        == Target("greet", "default")
    )
    assert parse_target("greet.default.svc:050051") == Target("greet", "default", 50051)
    assert parse_target("greet.prod:grpc") == Target.parse("greet.prod:grpc")
    for bad in ("default/greet", "greet", "greet.default:", "Greet.default"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_target(bad)


def test_resolve_human_and_json(server: tuple[RunningServer, list]) -> None:
    s, group = server
    proc = cli("resolve", "greet.default", "--server", s.address, "--count", "3")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "greet.default (version 1, round_robin, 3 pick(s))" in proc.stdout
    assert "ADDRESS" in proc.stdout and "zone-a" in proc.stdout
    for b in group:
        assert b.address in proc.stdout

    proc = cli(
        "--server", s.address, "--json", "resolve", "greet.default", "--router", "random", "--port", "grpc"
    )
    assert proc.returncode == EXIT_OK, proc.stderr
    data = json.loads(proc.stdout)
    assert data["target"] == "greet.default:grpc" and data["router"] == "random" and data["version"] == 1
    assert f"{data['address']}:{data['port']}" in {b.address for b in group}
    assert [e["port_name"] for e in data["endpoints"]] == ["grpc"]
    # the port as part of the target, as everywhere else
    proc = cli("--json", "resolve", "greet.default.svc:grpc", "--server", s.address)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert json.loads(proc.stdout)["target"] == "greet.default:grpc"


@pytest.mark.parametrize(
    ("args", "code", "hint"),
    [
        (["resolve", "nope.default"], EXIT_NOT_FOUND, "check the Service name and namespace"),
        (["resolve", "greet.default", "--port", "http"], EXIT_INVALID_ARGUMENT, "fix the port"),
        (["resolve", "greet.default:http"], EXIT_INVALID_ARGUMENT, "fix the port"),
        (["watch", "greet.nope", "--timeout", "10"], EXIT_NOT_FOUND, "kubectl get service greet -n nope"),
        (["status", "other.default"], EXIT_NOT_FOUND, "not tracked"),
    ],
)
def test_rpc_errors_have_exit_codes_and_hints(
    server: tuple[RunningServer, list], args: list[str], code: int, hint: str
) -> None:
    s, _ = server
    proc = cli(*args, "--server", s.address)
    assert proc.returncode == code, proc.stderr
    assert hint in proc.stderr and proc.stdout == ""


def test_unreachable_server() -> None:
    proc = cli("resolve", "greet.default", "--server", f"127.0.0.1:{free_port()}")
    assert proc.returncode == EXIT_UNAVAILABLE
    assert "cannot reach the lookaside server" in proc.stderr and "--server" in proc.stderr


def test_env_server_and_usage_errors(server: tuple[RunningServer, list]) -> None:
    s, _ = server
    env_proc = subprocess.run(
        [*CLI, "resolve", "greet.default"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "LOOKASIDE_ADDR": s.address},
    )
    assert env_proc.returncode == EXIT_OK, env_proc.stderr
    assert cli("resolve", "greet").returncode == EXIT_USAGE  # no namespace
    assert cli("resolve", "default/greet").returncode == EXIT_USAGE  # one grammar: service.namespace
    bad_name = cli("resolve", "Greet.default")  # checked before asking the server
    assert bad_name.returncode == EXIT_USAGE and "RFC 1035" in bad_name.stderr
    assert cli("resolve", "greet.default", "--count", "0").returncode == EXIT_USAGE
    two_ports = cli("resolve", "greet.default:grpc", "--port", "http", "--server", s.address)
    assert two_ports.returncode == EXIT_USAGE and "give one" in two_ports.stderr
    assert cli("resolve", "greet.default:grpc", "--port", "grpc", "--server", s.address).returncode == EXIT_OK
    assert cli("status", "greet.default:grpc").returncode == EXIT_USAGE
    assert cli("frobnicate").returncode == EXIT_USAGE
    helptext = cli("--help").stdout
    assert "exit codes:" in helptext and "NOT_FOUND" in helptext and "LOOKASIDE_ADDR" in helptext


def test_watch_prints_changes_json(
    server: tuple[RunningServer, list], static_file: pathlib.Path, backends: Callable[..., Backend]
) -> None:
    s, group = server
    proc = subprocess.Popen(
        [
            *CLI,
            "watch",
            "greet.default",
            "--server",
            s.address,
            "--json",
            "--max-updates",
            "2",
            "--timeout",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())  # the CLI ends by itself within --timeout
        assert first["initial"] and first["version"] == 1
        assert {f"{e['ip']}:{e['port']}" for e in first["endpoints"]} == {b.address for b in group}
        extra = backends()
        write_addresses(
            static_file, {TARGET: [group[0].address, extra.address]}, port_name="grpc", zone="zone-b"
        )
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == EXIT_OK, err
    second = json.loads(out.strip())
    assert second["version"] == 2 and not second["initial"]
    assert second["added"] == [extra.address] and second["removed"] == [group[1].address]


def test_watch_human_and_timeout(server: tuple[RunningServer, list]) -> None:
    s, group = server
    proc = cli("watch", "greet.default", "--server", s.address, "--max-updates", "1", "--timeout", "20")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "greet.default version 1: 2 endpoint(s) (initial set)" in proc.stdout
    assert group[0].address in proc.stdout
    # --timeout before --max-updates is reached: exit code for DEADLINE_EXCEEDED, after printing what came.
    proc = cli("watch", "greet.default", "--server", s.address, "--max-updates", "2", "--timeout", "0.5")
    assert proc.returncode == EXIT_DEADLINE
    assert "initial set" in proc.stdout and "timed out" in proc.stderr
    # --timeout alone is a normal end.
    assert cli("watch", "greet.default", "--server", s.address, "--timeout", "0.5").returncode == EXIT_OK


def test_status_human_and_json(server: tuple[RunningServer, list]) -> None:
    s, group = server
    proc = cli("status", "--server", s.address)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "0 tracked target(s)" in proc.stdout and "no targets tracked yet" in proc.stdout
    assert cli("resolve", "greet.default", "--server", s.address).returncode == EXIT_OK
    proc = cli("status", "--server", s.address)
    assert proc.returncode == EXIT_OK, proc.stderr
    lines = proc.stdout.splitlines()
    assert "1 tracked target(s)" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("TARGET"))
    assert lines[header + 1].split()[:5] == ["greet.default", "1", "2", "2", "0"]
    assert "TERMINATING" in proc.stdout and group[1].address in proc.stdout

    proc = cli("status", "greet.default", "--server", s.address, "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    data = json.loads(proc.stdout)
    (t,) = data["targets"]
    assert (t["target"], t["version"], t["endpoints_total"], t["endpoints_ready"], t["watchers"]) == (
        "greet.default",
        1,
        2,
        2,
        0,
    )
    assert {f"{e['ip']}:{e['port']}" for e in t["endpoints"]} == {b.address for b in group}
    assert all(e["zone"] == "zone-a" and e["ready"] and not e["terminating"] for e in t["endpoints"])
    assert data["source"].startswith("static file ") and data["source"].endswith("endpoints.yaml")
    assert data["server_version"]


def test_permission_denied_names_the_server_flag(static_file: pathlib.Path) -> None:
    write_addresses(static_file, {"other/greet": ["127.0.0.1:50051"]})
    config = ServerConfig(
        listen=ListenConfig(host="127.0.0.1", port=0),
        source=StaticFileConfig(static_file),
        security=SecurityConfig(access=AccessConfig(namespaces=frozenset({"default"}))),
    )
    with run_in_thread(config) as s:
        proc = cli("resolve", "greet.other", "--server", s.address)
        assert proc.returncode == EXIT_PERMISSION_DENIED, proc.stderr
        assert "--allow-namespace" in proc.stderr
        assert cli("status", "greet.other", "--server", s.address).returncode == EXIT_PERMISSION_DENIED


def test_cli_needs_only_the_client(server: tuple[RunningServer, list]) -> None:
    """After a client-only install (no yaml, kubernetes, prometheus, grpc-status, lookaside_server) the CLI
    still works: it is a client of the wire protocol."""
    s, group = server
    code = f"from lookaside_grpc._cli import main; main(['--server', {s.address!r}, '--json', "
    for args in ("'resolve', 'greet.default'", "'status'"):
        proc = subprocess.run(
            without_server_extra(code + args + "])", "lookaside_server"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == EXIT_OK, proc.stderr
        assert json.loads(proc.stdout)
    version = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("lookaside ")


def test_lookaside_server_without_the_server_extra_says_what_to_install() -> None:
    proc = subprocess.run(
        without_server_extra("from lookaside_grpc._server_entry import main; main(['--help'])"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "pip install 'lookaside-grpc[server]'" in proc.stderr
    # with the extra it is the server's own command line
    proc = subprocess.run(
        [sys.executable, "-c", "from lookaside_grpc._server_entry import main; main(['--help'])"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and "usage: lookaside-server" in proc.stdout
