"""xds mode: ``lookaside_grpc.channel(..., mode="xds")`` (and the aio twin) is grpc's own ``xds:///`` channel,
bootstrapped by the library to the real lookaside server (in-process, static file of 127.0.0.1 backends).
grpc's xDS bootstrap is process-wide, so the client runs in a child process (no GRPC_XDS_* in its env)."""

from __future__ import annotations

import json
import os
import pathlib
import queue
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

import lookaside_grpc
import lookaside_grpc.aio
from lookaside_dev.backends import Backend
from lookaside_dev.static_files import write_addresses
from lookaside_server import (
    ListenConfig,
    RunningServer,
    ServerConfig,
    StaticFileConfig,
    XdsConfig,
    run_in_thread,
)

TARGET = "default/greet"
REPO = pathlib.Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from collections import Counter
    import grpc
    import lookaside_grpc, lookaside_grpc.aio
    from examples.greet import greet_pb2, greet_pb2_grpc

    flavour, lookaside = sys.argv[1], sys.argv[2]
    HELLO = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="Ada", last_name="Lovelace"))

    def backend_of(result):
        return result.rsplit(" from ", 1)[-1]

    def other(address):
        try:
            lookaside_grpc.channel("greet.default", lookaside=address, mode="xds").close()
            return None
        except ValueError as e:
            return str(e)

    def answer(out, counts, errors):
        out.update(counts=dict(counts), failures=len(errors), errors=errors[:5])
        print(json.dumps(out), flush=True)

    def run_sync():
        with lookaside_grpc.channel("greet.default", lookaside=lookaside, mode="xds") as channel:
            assert isinstance(channel, lookaside_grpc.XdsChannel), type(channel)
            greet = greet_pb2_grpc.GreetServiceStub(channel).Greet
            for line in sys.stdin:
                cmd, counts, errors, out = json.loads(line), Counter(), [], {}
                if "other" in cmd:
                    out["error"] = other(cmd["other"])
                    answer(out, counts, errors)
                    continue
                n = int(cmd.get("call") or cmd.get("max"))
                for i in range(1, n + 1):
                    try:
                        b = backend_of(greet(HELLO, timeout=5, wait_for_ready=True).result)
                    except grpc.RpcError as e:
                        errors.append(f"{e.code().name}: {e.details()}")
                        continue
                    counts[b] += 1
                    if b == cmd.get("until"):
                        out["hit_at"] = time.time()
                        break
                answer(out, counts, errors)

    async def run_aio():
        loop = asyncio.get_running_loop()
        async with lookaside_grpc.aio.channel("greet.default", lookaside=lookaside, mode="xds") as channel:
            assert isinstance(channel, lookaside_grpc.aio.AioXdsChannel), type(channel)
            greet = greet_pb2_grpc.GreetServiceStub(channel).Greet
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                cmd, counts, errors, out = json.loads(line), Counter(), [], {}
                n = int(cmd.get("call") or cmd.get("max"))
                for i in range(1, n + 1):
                    try:
                        b = backend_of((await greet(HELLO, timeout=5, wait_for_ready=True)).result)
                    except grpc.RpcError as e:
                        errors.append(f"{e.code().name}: {e.details()}")
                        continue
                    counts[b] += 1
                    if b == cmd.get("until"):
                        out["hit_at"] = time.time()
                        break
                answer(out, counts, errors)

    run_sync() if flavour == "sync" else asyncio.run(run_aio())
    """
)


class Driver:
    """A child process holding one xds-mode channel: one JSON command in, one JSON line out."""

    def __init__(
        self, tmp: pathlib.Path, flavour: str, lookaside: str, env: dict[str, str] | None = None
    ) -> None:
        script = tmp / "xds_mode_driver.py"
        script.write_text(DRIVER)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_XDS_BOOTSTRAP")}
        environ.update(env or {}, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, str(script), flavour, lookaside],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def command(self, timeout: float = 30.0, **command: object) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        try:
            return json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            pytest.fail(f"driver did not answer {command} within {timeout} s: {err[-2000:]}")

    def call(self, n: int) -> tuple[Counter[str], int, list[str]]:
        out = self.command(call=n)
        return Counter(out["counts"]), out["failures"], out["errors"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def lookaside(tmp_path: pathlib.Path) -> Iterator[tuple[pathlib.Path, RunningServer]]:
    static_file = tmp_path / "endpoints.json"
    write_addresses(static_file, {TARGET: []})
    server = run_in_thread(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, grace=1.0),
            source=StaticFileConfig(static_file, poll_interval=0.02),
            xds=XdsConfig(),
        )
    )
    yield static_file, server
    server.stop()


@pytest.fixture
def driver(tmp_path: pathlib.Path) -> Iterator[Callable[..., Driver]]:
    started: list[Driver] = []

    def start(flavour: str, lookaside: str, env: dict[str, str] | None = None) -> Driver:
        d = Driver(tmp_path, flavour, lookaside, env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def warm_up(client: Driver, want: set[str], deadline: float = 20.0) -> None:
    seen: set[str] = set()
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        counts, failures, errors = client.call(20)
        assert failures == 0, errors
        seen |= set(counts)
        if want <= seen:
            return
    pytest.fail(f"backends {sorted(want - seen)} never answered within {deadline} s")


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_xds_mode_spreads_calls_and_follows_endpoint_changes(
    backends: Callable[..., Backend],
    lookaside: tuple[pathlib.Path, RunningServer],
    driver: Callable[..., Driver],
    flavour: str,
) -> None:
    static_file, server = lookaside
    group = [backends() for _ in range(3)]
    write_addresses(static_file, {TARGET: [b.address for b in group]})
    client = driver(flavour, server.address)
    warm_up(client, {b.address for b in group})
    counts, failures, errors = client.call(300)
    assert failures == 0, errors
    assert set(counts) == {b.address for b in group}
    # one locality per endpoint: C-core picks localities at random by weight, so each count is
    # Binomial(300, 1/3) (sd 8.2); 55..145 is +-5.5 sd (see test_xds_e2e)
    assert all(55 <= n <= 145 for n in counts.values()), counts

    new = backends()
    changed_at = time.time()
    write_addresses(static_file, {TARGET: [b.address for b in group[1:]] + [new.address]})
    out = client.command(until=new.address, max=100_000, timeout=40)
    assert out["failures"] == 0, out["errors"]
    assert out.get("hit_at") is not None, f"{new.address} never got a call: {out}"
    assert out["hit_at"] - changed_at < 5.0
    # the removed backend stops getting calls
    end = time.monotonic() + 20
    while time.monotonic() < end:
        counts, failures, errors = client.call(30)
        assert failures == 0, errors
        if counts[group[0].address] == 0:
            break
    else:
        pytest.fail(f"{group[0].address} still gets calls after its removal")


def test_xds_mode_one_lookaside_per_process(
    backends: Callable[..., Backend],
    lookaside: tuple[pathlib.Path, RunningServer],
    driver: Callable[..., Driver],
) -> None:
    static_file, server = lookaside
    b = backends()
    write_addresses(static_file, {TARGET: [b.address]})
    client = driver("sync", server.address)
    counts, failures, errors = client.call(5)
    assert failures == 0 and counts == {b.address: 5}, errors
    assert client.command(other=server.address)["error"] is None  # the same lookaside: fine
    error = client.command(other="127.0.0.1:1")["error"]
    assert error and "one xDS bootstrap per process" in error


def test_xds_mode_refuses_a_bootstrap_naming_another_server(
    lookaside: tuple[pathlib.Path, RunningServer], driver: Callable[..., Driver]
) -> None:
    _, server = lookaside
    other = json.dumps(
        {"xds_servers": [{"server_uri": "10.9.9.9:18000", "channel_creds": [{"type": "insecure"}]}]}
    )
    client = driver("sync", server.address, env={"GRPC_XDS_BOOTSTRAP_CONFIG": other})
    client.proc.stdin.close()  # type: ignore[union-attr]
    assert client.proc.wait(30) != 0
    assert "names the xDS server '10.9.9.9:18000'" in (
        client.proc.stderr.read() if client.proc.stderr else ""
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"policy": "least_request"}, "policy"),
        ({"max_staleness": 5.0}, "max_staleness"),
        ({"lookaside_keepalive": 5.0}, "lookaside_keepalive"),
        ({"lookaside_credentials": None}, "lookaside_credentials"),
        ({"init_timeout": 1.0}, "init_timeout"),
    ],
)
def test_xds_mode_refuses_options_that_do_nothing_there(kwargs: dict, name: str) -> None:
    # refused before any channel or bootstrap exists (nothing process-wide is touched)
    for factory in (lookaside_grpc.channel, lookaside_grpc.aio.channel):
        with pytest.raises(ValueError, match=f"xds mode does not take '{name}'"):
            factory("greet.default", lookaside="127.0.0.1:1", mode=lookaside_grpc.Xds(), **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword"):
        lookaside_grpc.channel("greet.default", mode="xds", nonsense=1)  # type: ignore[call-overload]


def test_interceptors_refuse_xds_mode() -> None:
    with pytest.raises(ValueError, match="channel\\(\\)/aio.channel\\(\\) only"):
        lookaside_grpc.LookasideInterceptor(
            "127.0.0.1:1",
            {"greet.GreetService": "greet.default"},
            mode="xds",  # type: ignore[arg-type]
        )
