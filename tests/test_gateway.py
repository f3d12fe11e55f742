"""The Greet REST gateway (examples/gateway.py) in front of real backends via the real lookaside server."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from examples.gateway import serve
from lookaside_dev.backends import Backend, greet_backend_of
from lookaside_dev.static_files import write_addresses
from lookaside_server import ListenConfig, RunningServer, ServerConfig, StaticFileConfig, run_in_thread

Start = Callable[..., str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, method: str = "POST", body: bytes | None = None) -> tuple[int, dict]:
    """HTTP status and JSON body (error statuses too); the body is never empty."""
    req = urllib.request.Request(
        url,
        method=method,
        data=body,
        headers={"Content-Type": "application/json"} if body is not None else {},
    )
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    assert raw, f"empty body with HTTP {status}"
    return status, json.loads(raw)


def greet_json(first: object = "Ada", last: object = "Lovelace") -> bytes:
    return json.dumps({"first_name": first, "last_name": last}).encode()


@pytest.fixture
def lookaside(
    tmp_path: pathlib.Path, backends: Callable[..., Backend]
) -> Iterator[tuple[RunningServer, list]]:
    group = [backends(), backends()]
    path = tmp_path / "endpoints.yaml"
    write_addresses(
        path, {"default/greet": [b.address for b in group], "default/down": [f"127.0.0.1:{free_port()}"]}
    )
    with run_in_thread(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0),
            source=StaticFileConfig(path, poll_interval=0.02),
        )
    ) as s:
        yield s, group


@pytest.fixture
def gateway() -> Iterator[Start]:
    started = []

    def start(lookaside: str, service: str = "greet", timeout: float = 5.0) -> str:
        server, channel = serve(lookaside, service, "default", "127.0.0.1", 0, timeout=timeout)
        started.append((server, channel))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, channel in started:
        server.shutdown()
        server.server_close()
        channel.close()


def test_greet_ok_spreads_over_backends(lookaside: tuple[RunningServer, list], gateway: Start) -> None:
    s, group = lookaside
    url = gateway(s.address) + "/greet"
    seen = set()
    for _ in range(4):
        status, data = request(url, body=greet_json())
        assert status == 200
        assert data["result"].startswith("Hello Ada Lovelace from ")
        seen.add(greet_backend_of(data["result"]))
    assert seen == {b.address for b in group}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "not valid JSON"),
        (json.dumps({"first_name": "Ada"}).encode(), "missing field 'last_name'"),
        (greet_json(first=7), "'first_name' must be a string"),
        (json.dumps({"first_name": "A", "last_name": "B", "x": 1}).encode(), "unknown field(s): x"),
    ],
)
def test_bad_requests_are_400(
    lookaside: tuple[RunningServer, list], gateway: Start, body: bytes, message: str
) -> None:
    s, _ = lookaside
    status, data = request(gateway(s.address) + "/greet", body=body)
    assert status == 400 and message in data["error"]


def test_paths_methods_and_grpc_errors(lookaside: tuple[RunningServer, list], gateway: Start) -> None:
    s, _ = lookaside
    url = gateway(s.address)
    assert request(url + "/nope", body=greet_json())[0] == 404
    status, data = request(url + "/greet", method="GET")
    assert status == 405 and "use POST" in data["error"]
    assert request(url + "/greet", method="PUT", body=b"{}")[0] == 405
    assert request(url + "/healthz", method="GET") == (200, {"status": "ok"})
    # The backend refuses: FAILED_PRECONDITION -> 400, with the gRPC status named.
    status, data = request(url + "/greet", body=greet_json(first="fail"))
    assert status == 400 and data["grpc_status"] == "FAILED_PRECONDITION"
    # An unknown Greet Service: the lookaside's NOT_FOUND -> 404.
    status, data = request(gateway(s.address, service="missing") + "/greet", body=greet_json())
    assert status == 404 and data["grpc_status"] == "NOT_FOUND"


def test_unavailable_is_503(lookaside: tuple[RunningServer, list], gateway: Start) -> None:
    s, _ = lookaside
    status, data = request(gateway(s.address, service="down", timeout=2) + "/greet", body=greet_json())
    assert status == 503 and data["grpc_status"] == "UNAVAILABLE"
    status, data = request(gateway(f"127.0.0.1:{free_port()}", timeout=1) + "/greet", body=greet_json())
    assert status == 503 and data["grpc_status"] == "UNAVAILABLE"


def test_module_entry_point_with_env(lookaside: tuple[RunningServer, list]) -> None:
    s, _ = lookaside
    env = {
        **os.environ,
        "LOOKASIDE_ADDR": s.address,
        "GREET_SERVICE": "greet",
        "GREET_NAMESPACE": "default",
        "GATEWAY_PORT": "0",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.gateway", "--host", "127.0.0.1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        address = json.loads(line)["listening"]
        status, data = request(f"http://{address}/greet", body=greet_json())
        assert status == 200 and "Ada Lovelace" in data["result"]
        proc.terminate()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
