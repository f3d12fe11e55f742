"""End to end: the real lookaside server over a static file, real Greet backends, the real client."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc
import pytest

import lookaside_grpc
import lookaside_grpc.aio
from examples.greet import greet_pb2, greet_pb2_grpc
from lookaside_dev.backends import Backend, greet_backend_of
from lookaside_dev.static_files import write_addresses
from lookaside_grpc import protocol
from lookaside_server import ListenConfig, ServerConfig, StaticFileConfig, run_in_thread

TARGET = "default/greet"
HELLO = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="Ada", last_name="Lovelace"))


@pytest.fixture
def static_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "endpoints.yaml"


@pytest.fixture
def lookaside(static_file: pathlib.Path) -> Callable[[list[str]], str]:
    """Start the real lookaside server over ``static_file`` once the test has written its endpoints."""
    running = []

    def start(addresses: list[str]) -> str:
        write_addresses(static_file, {TARGET: addresses})
        server = run_in_thread(
            ServerConfig(
                listen=ListenConfig(host="127.0.0.1", port=0),
                source=StaticFileConfig(static_file, poll_interval=0.02),
            )
        )
        running.append(server)
        return server.address

    yield start
    for server in running:
        server.stop()


def wait_for_set(lookaside_addr: str, want: set[int], timeout: float = 10.0) -> None:
    """Block until the lookaside's Watch stream shows exactly the ports ``want`` (or fail at the deadline)."""
    with grpc.insecure_channel(lookaside_addr) as ch:
        stream = protocol.LookasideStub(ch).Watch(
            protocol.WatchRequest(service="greet", namespace="default"), timeout=timeout
        )
        for update in stream:
            if {e.port for e in update.endpoints} == want:
                stream.cancel()
                return
    pytest.fail(f"lookaside never showed {want}")


def greet_until(stub: greet_pb2_grpc.GreetServiceStub, want: str, limit: int = 5000) -> tuple[Counter, int]:
    """Call until ``want`` answers (bounded in count); return the spread and the number of calls sent."""
    spread: Counter[str] = Counter()
    for sent in range(1, limit + 1):
        spread[greet_backend_of(stub.Greet(HELLO, timeout=5).result)] += 1
        if spread[want]:
            return spread, sent
    pytest.fail(f"{want} never got a call in {limit} calls")


@pytest.mark.parametrize("mode", ["watch", "per_call"])
def test_exact_spread_and_one_connection_per_backend(
    backends: Callable[..., Backend], lookaside: Callable[[list[str]], str], mode: str
) -> None:
    group = [backends() for _ in range(3)]
    addr = lookaside([b.address for b in group])
    with lookaside_grpc.channel("greet", namespace="default", lookaside=addr, mode=mode) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        spread = Counter(greet_backend_of(stub.Greet(HELLO, timeout=5).result) for _ in range(300))
    assert spread == {b.address: 100 for b in group}
    assert [b.servicer.stats()["connections"] for b in group] == [1, 1, 1]


def test_shared_rotation_across_many_small_clients(
    backends: Callable[..., Backend], lookaside: Callable[[list[str]], str]
) -> None:
    """per_call mode: 30 clients making 1 call each still spread exactly (the server's rotation is shared)."""
    group = [backends() for _ in range(3)]
    addr = lookaside([b.address for b in group])
    spread: Counter[str] = Counter()
    for _ in range(30):
        with lookaside_grpc.channel("greet", namespace="default", lookaside=addr, mode="per_call") as ch:
            spread[greet_backend_of(greet_pb2_grpc.GreetServiceStub(ch).Greet(HELLO, timeout=5).result)] += 1
    assert spread == {b.address: 10 for b in group}


def test_endpoint_change_in_watch_mode_without_errors(
    backends: Callable[..., Backend], lookaside: Callable[[list[str]], str], static_file: pathlib.Path
) -> None:
    a, b, c = backends(), backends(), backends()
    addr = lookaside([a.address, b.address])
    errors: list[BaseException] = []
    with lookaside_grpc.channel("greet", namespace="default", lookaside=addr, mode="watch") as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        # A background caller keeps calls flowing while the set changes: none of them may fail.
        stop = threading.Event()

        def keep_calling() -> None:
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    stub.Greet(HELLO, timeout=5)
                except grpc.RpcError as err:  # pragma: no cover - the assertion below reports it
                    errors.append(err)

        caller = threading.Thread(target=keep_calling)
        caller.start()
        try:
            write_addresses(static_file, {TARGET: [a.address, b.address, c.address]})
            greet_until(stub, c.address)
            write_addresses(static_file, {TARGET: [b.address, c.address]})
            wait_for_set(addr, {b.port, c.port})
            # Our channel's Watch stream may lag the probe's a moment: poll until a is no longer picked.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                batch = Counter(greet_backend_of(stub.Greet(HELLO, timeout=5).result) for _ in range(10))
                if not batch[a.address]:
                    break
        finally:
            stop.set()
            caller.join(10)
        calls_a = a.servicer.stats()["calls"]
        after = Counter(greet_backend_of(stub.Greet(HELLO, timeout=5).result) for _ in range(100))
    assert after == {b.address: 50, c.address: 50}
    assert a.servicer.stats()["calls"] == calls_a
    assert errors == []


async def test_aio_channel_follows_endpoint_change(
    backends: Callable[..., Backend], lookaside: Callable[[list[str]], str], static_file: pathlib.Path
) -> None:
    a, b = backends(), backends()
    addr = lookaside([a.address])
    async with lookaside_grpc.aio.channel("greet", namespace="default", lookaside=addr) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        first = await stub.Greet(HELLO, timeout=5)
        assert greet_backend_of(first.result) == a.address
        write_addresses(static_file, {TARGET: [a.address, b.address]})
        seen: Counter[str] = Counter()
        for _ in range(2000):
            seen[greet_backend_of((await stub.Greet(HELLO, timeout=5)).result)] += 1
            if seen[b.address]:
                break
        assert seen[b.address] == 1
        replies = [greet_backend_of(r.result) async for r in stub.GreetManyTimes(HELLO, timeout=5)]
        assert len(replies) == 3 and len(set(replies)) == 1


def test_demo_runs_and_reaches_the_new_backend() -> None:
    """The README's demo (``lookaside-demo``) at a small size: exit 0, a table, the 4th backend reached."""
    out = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--calls", "60"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("127.0.0.1:")]
    assert len(rows) == 4
    assert [int(r[1]) for r in rows[:3]] == [20, 20, 20]  # exact round robin before the change
    assert int(rows[3][1]) == 0 and int(rows[3][2]) > 0  # the new backend only after the change
    assert all(r[3] == "1" for r in rows)  # one connection per backend
    assert "failed calls: 0" in out.stdout
