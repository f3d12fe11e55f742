"""End to end: a stock ``grpc.insecure_channel("xds:///greet.default")`` in a subprocess, bootstrapped to the
real lookaside server (xDS on its gRPC port) over a static file, against real Greet backends."""

from __future__ import annotations

import json
import os
import pathlib
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

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
from lookaside_server._xds.resources import XdsOptions

TARGET = "default/greet"
CLIENT = pathlib.Path(__file__).resolve().parent.parent / "lookaside_dev" / "xds_client.py"
REPO = pathlib.Path(__file__).resolve().parents[1]


def bootstrap(address: str, node: str = "test-client") -> str:
    return json.dumps(
        {
            "xds_servers": [
                {
                    "server_uri": address,
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }
            ],
            "node": {"id": node, "cluster": "tests", "locality": {"zone": "local"}},
        }
    )


class XdsClient:
    """The driver subprocess (lookaside_dev/xds_client.py): one JSON command in, one JSON line out."""

    def __init__(self, target: str, lookaside: str) -> None:
        env = dict(os.environ, GRPC_XDS_BOOTSTRAP_CONFIG=bootstrap(lookaside), PYTHONPATH=str(REPO))
        env.pop("GRPC_XDS_BOOTSTRAP", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(CLIENT), target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
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
            pytest.fail(f"xDS client did not answer {command} within {timeout} s (exit {self.proc.poll()})")

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
def static_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "endpoints.json"


@pytest.fixture
def lookaside(static_file: pathlib.Path) -> Iterator[Callable[..., RunningServer]]:
    """Start (or restart, with ``port=``) the real lookaside server over ``static_file``."""
    running: list[RunningServer] = []

    def start(port: int = 0, options: XdsOptions | None = None) -> RunningServer:
        server = run_in_thread(
            ServerConfig(
                listen=ListenConfig(host="127.0.0.1", port=port, grace=1.0),
                source=StaticFileConfig(static_file, poll_interval=0.02),
                xds=XdsConfig(options=options),
            )
        )
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


@pytest.fixture
def xds_client() -> Iterator[Callable[[str, str], XdsClient]]:
    clients: list[XdsClient] = []

    def start(target: str, lookaside: str) -> XdsClient:
        client = XdsClient(target, lookaside)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.close()


def warm_up(client: XdsClient, want: set[str], deadline: float = 20.0) -> None:
    """Call until every backend in ``want`` has answered (all subchannels connected)."""
    seen: set[str] = set()
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        counts, failures, errors = client.call(20)
        assert failures == 0, errors
        seen |= set(counts)
        if want <= seen:
            return
    pytest.fail(f"backends {sorted(want - seen)} never answered within {deadline} s")


def until(client: XdsClient, backend: str, changed_at: float, deadline: float = 20.0) -> float:
    """Call until ``backend`` answers; return seconds from ``changed_at`` (time.time()) to that answer."""
    out = client.command(until=backend, max=200_000, timeout=deadline + 10)
    assert out["failures"] == 0, out["errors"]
    assert out["hit_at"] is not None, f"{backend} never got a call: {out}"
    return out["hit_at"] - changed_at


def until_gone(client: XdsClient, backend: str, deadline: float = 20.0) -> None:
    """Call in batches until a batch misses ``backend`` (it was removed), with zero failures throughout."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        counts, failures, errors = client.call(30)
        assert failures == 0, errors
        if counts[backend] == 0:
            return
    pytest.fail(f"{backend} still gets calls {deadline} s after its removal")


@pytest.mark.parametrize("rds", [False, True], ids=["inline-routes", "rds"])
def test_stock_xds_channel_balances_across_backends(
    backends: Callable[..., Backend],
    static_file: pathlib.Path,
    lookaside: Callable[..., RunningServer],
    xds_client: Callable[[str, str], XdsClient],
    rds: bool,
) -> None:
    group = [backends() for _ in range(3)]
    write_addresses(static_file, {TARGET: [b.address for b in group]})
    server = lookaside(options=XdsOptions(rds=rds))
    client = xds_client("xds:///greet.default", server.address)
    warm_up(client, {b.address for b in group})
    counts, failures, errors = client.call(300)
    assert failures == 0, errors
    assert set(counts) == {b.address for b in group}
    # One locality per endpoint (so load weights can act): C-core's weighted_target picks a locality at random
    # by weight, so each count is Binomial(300, 1/3) (sd 8.2), not round robin's exact 100 (80..120 failed
    # about once in 20 runs). 55..145 is +-5.5 sd: a correct balancer misses it ~1e-7 of the time, while an
    # unbalanced one (a backend starved or favoured 1.5x) still fails.
    assert all(55 <= n <= 145 for n in counts.values()), counts


def test_stock_xds_channel_with_port_in_name(
    backends: Callable[..., Backend],
    static_file: pathlib.Path,
    lookaside: Callable[..., RunningServer],
    xds_client: Callable[[str, str], XdsClient],
) -> None:
    a, b = backends(), backends()
    # two ports of one Service: "grpc" on a, "admin" on b (same Pod IP, different ports)
    static_file.write_text(
        json.dumps(
            {
                TARGET: [
                    {"ip": "127.0.0.1", "port": a.port, "port_name": "grpc"},
                    {"ip": "127.0.0.1", "port": b.port, "port_name": "admin"},
                ]
            }
        )
    )
    server = lookaside()
    by_name = xds_client("xds:///greet.default:admin", server.address)
    by_number = xds_client(f"xds:///greet.default:{a.port}", server.address)
    default = xds_client("xds:///greet.default", server.address)
    # other spellings of the same Service ports: the Listener carries the dialled name, the cluster behind it
    # the canonical one (greet.default:admin, greet.default:<port>)
    alias_name = xds_client("xds:///greet.default.svc:admin", server.address)
    alias_number = xds_client(f"xds:///greet.default.svc.cluster.local:0{a.port}", server.address)
    for client, want in ((by_name, b), (by_number, a), (default, a), (alias_name, b), (alias_number, a)):
        counts, failures, errors = client.call(20)
        assert failures == 0, errors
        assert set(counts) == {want.address}


def test_stock_xds_channel_dials_the_service_port(
    backends: Callable[..., Backend],
    static_file: pathlib.Path,
    lookaside: Callable[..., RunningServer],
    xds_client: Callable[[str, str], XdsClient],
) -> None:
    """``xds:///greet.default:80`` as inside the cluster: Service port 80, each pod on its own target port."""
    group = [backends(), backends()]
    items = [{"ip": "127.0.0.1", "port": g.port, "port_name": "grpc", "service_port": 80} for g in group]
    static_file.write_text(json.dumps({TARGET: items}))
    server = lookaside()
    client = xds_client("xds:///greet.default:80", server.address)
    warm_up(client, {g.address for g in group})


def test_stock_xds_channel_follows_endpoint_changes(
    backends: Callable[..., Backend],
    static_file: pathlib.Path,
    lookaside: Callable[..., RunningServer],
    xds_client: Callable[[str, str], XdsClient],
) -> None:
    group = [backends() for _ in range(3)]
    extra = backends()
    write_addresses(static_file, {TARGET: [b.address for b in group]})
    server = lookaside()
    client = xds_client("xds:///greet.default", server.address)
    warm_up(client, {b.address for b in group})

    delays = []
    for _ in range(5):
        changed_at = time.time()
        write_addresses(static_file, {TARGET: [b.address for b in [*group, extra]]})
        delays.append(until(client, extra.address, changed_at))
        write_addresses(static_file, {TARGET: [b.address for b in group]})
        until_gone(client, extra.address)
    counts, failures, errors = client.call(150)
    assert failures == 0, errors
    assert extra.address not in counts and set(counts) == {b.address for b in group}

    # remove one of the original three: it stops getting calls, the others carry on
    write_addresses(static_file, {TARGET: [b.address for b in group[1:]]})
    until_gone(client, group[0].address)
    counts, failures, errors = client.call(100)
    assert failures == 0, errors
    assert set(counts) == {group[1].address, group[2].address}
    print(
        f"\nxDS change propagation (static poll 0.02 s), file write -> first call on the new backend: "
        f"median {statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms "
        f"({', '.join(f'{d * 1000:.0f}' for d in delays)} ms)"
    )


def test_stock_xds_channel_survives_lookaside_restart(
    backends: Callable[..., Backend],
    static_file: pathlib.Path,
    lookaside: Callable[..., RunningServer],
    xds_client: Callable[[str, str], XdsClient],
) -> None:
    group = [backends() for _ in range(3)]
    extra = backends()
    write_addresses(static_file, {TARGET: [b.address for b in group]})
    server = lookaside()
    port = server.port
    client = xds_client("xds:///greet.default", server.address)
    warm_up(client, {b.address for b in group})

    server.stop()
    counts, failures, errors = client.call(300)  # the last config keeps working without the control plane
    assert failures == 0, errors
    assert set(counts) == {b.address for b in group}

    restarted_at = time.time()
    lookaside(port=port)
    changed_at = time.time()
    write_addresses(static_file, {TARGET: [b.address for b in [*group, extra]]})
    delay = until(client, extra.address, changed_at, deadline=40.0)
    write_addresses(static_file, {TARGET: [b.address for b in group]})
    until_gone(client, extra.address)
    print(
        f"\nafter a lookaside restart, the change reached the client {delay:.2f} s after the file write "
        f"({time.time() - restarted_at:.2f} s after the restart, incl. the removal)"
    )
