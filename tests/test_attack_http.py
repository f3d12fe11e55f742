"""Attacks on the HTTP listener (status page, /healthz, /metrics) of a lookaside server process.

* 5,000 idle or half-open connections against a server limited to 1,024 open files: the connection cap
  (``--http-max-connections``, default 256) keeps the server's descriptors bounded, so gRPC Resolve, /healthz
  and the static file keep working; every connection beyond the cap is counted in /metrics.
* Slow request headers and idle keep-alive connections are cut off (``--http-header-timeout``,
  ``--http-idle-timeout``); slow headers are counted.
* Request bodies are rejected (405/413) and never read as a further request.

The server runs as a subprocess (``python -m lookaside_server``); the attack sockets are opened here, with
this process's own (higher) open-file limit. Figures go to FIGURES and are printed (pytest -s).
"""

from __future__ import annotations

import http.client
import os
import re
import resource
import selectors
import socket
import statistics
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lookaside_dev.attack import ServerProcess, wait_for
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb

CONNECTIONS = 5000
ATTACK_SOURCE = "127.0.0.2"  # the attack connections' source address (see _open_many)
SERVER_NOFILE = 1024
CAP = 256  # --http-max-connections default
ACCEPT_BATCH = 100  # connections the server's event loop accepts per turn
FAST_MS = 100.0
FIGURES: dict[str, object] = {}
_STATUS_PAGE = re.compile(r"status page on http://\S+:(\d+)/")


def _endpoints(ip: str) -> dict[str, list[dict[str, object]]]:
    return {"default/greet": [{"ip": ip, "port": 50051, "port_name": "grpc"}]}


class HttpTarget:
    """A lookaside server process with its HTTP listener on a free port."""

    def __init__(self, tmp: Path, extra: list[str]) -> None:
        self.file = tmp / "endpoints.json"
        write_static(self.file, _endpoints("10.0.0.1"))
        self.server = ServerProcess(self.file, tmp / "server.log", extra=["--http-port", "0", *extra]).start()
        deadline = time.monotonic() + 10
        while not (m := _STATUS_PAGE.search(self.server.tail(100_000))):
            assert time.monotonic() < deadline, self.server.tail()
            time.sleep(0.02)
        self.http_port = int(m.group(1))
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pb.LookasideStub(self.channel)

    # --- the server process -------------------------------------------------------------------------

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.server.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.server.pid}/task"))

    # --- requests -----------------------------------------------------------------------------------

    def get(
        self, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()

    def healthz_ms(self) -> float:
        start = time.monotonic()
        status, body = self.get("/healthz", timeout=5.0)
        assert (status, body) == (200, b"ok\n")
        return (time.monotonic() - start) * 1000

    def resolve_ms(self, fresh: bool = True) -> tuple[float, str]:
        """One Resolve (on a new connection if ``fresh``): milliseconds and the address answered."""
        start = time.monotonic()
        if fresh:
            with grpc.insecure_channel(self.server.address) as ch:
                resp = pb.LookasideStub(ch).Resolve(
                    pb.Request(service="greet", namespace="default"), timeout=5
                )
        else:
            resp = self.stub.Resolve(pb.Request(service="greet", namespace="default"), timeout=5)
        return (time.monotonic() - start) * 1000, resp.address

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        _, text = self.get("/metrics")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples
        }

    def limit_hits(self, limit: str) -> float:
        return self.metrics().get(("lookaside_limit_hits_total", (("limit", limit),)), 0.0)

    def close(self) -> int | None:
        self.channel.close()
        return self.server.stop()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[object]:
    started: list[HttpTarget] = []

    def run(*extra: str) -> HttpTarget:
        t = HttpTarget(tmp_path, list(extra))
        started.append(t)
        return t

    yield run
    for t in started:
        t.close()


def _probes(t: HttpTarget, n: int, attempts: int = 3, period: float = 0.5) -> tuple[list[float], int]:
    """``n`` probes of /healthz as a kubelet makes them: a probe fails only after ``attempts`` refused
    connections in a row, ``period`` apart (a kubelet's periodSeconds is at least 1). Returns their times
    and how many connections were refused on the way.

    Why refusals can happen at all: for MIN_EVICT_AGE (0.1 s) after it was accepted, a connection is never
    evicted at the cap (its request may still be unread), so in the first tens of milliseconds after a
    burst every slot may be that young and a probe is closed at once (measured: refused for 10-55 ms after
    the last wave, then answered). A listener that refused probes for good still fails here."""
    times: list[float] = []
    refused = 0
    for _ in range(n):
        for attempt in range(attempts):
            try:
                times.append(t.healthz_ms())
                break
            except (ConnectionResetError, http.client.RemoteDisconnected):
                refused += 1
                if attempt == attempts - 1:
                    raise
                time.sleep(period)  # the probe period: the next probe, not a wait for an event
    return times, refused


def _raise_own_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.fail(f"the attack needs {need} open files in the test process; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _accept_queue(port: int) -> int | None:
    """Connections the kernel holds for the listener on 127.0.0.1:``port`` that the server has not accepted
    yet (the rx_queue of a LISTEN socket in /proc/net/tcp), None if it is not listening."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":
                return int(fields[4].split(":")[1], 16)
    return None


def _open_many(port: int, n: int, wave: int = 500, partial_every: int = 2) -> list[socket.socket]:
    """Open ``n`` connections in waves of ``wave`` (below the listen backlog, so the kernel never drops a
    handshake), each wave once the server has accepted the last one; every ``partial_every``-th connection
    sends half a request. Returns the sockets (all connected)."""
    socks: list[socket.socket] = []
    for first in range(0, n, wave):
        sel = selectors.DefaultSelector()
        for i in range(first, min(n, first + wave)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # From 127.0.0.2 and closed with a reset (no TIME_WAIT): thousands of attack connections must not
            # use up the ephemeral ports of 127.0.0.1, which the probes here and every later test dial from.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.bind((ATTACK_SOURCE, 0))
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
            sel.register(s, selectors.EVENT_WRITE, i)
        pending = len(sel.get_map())
        deadline = time.monotonic() + 10
        while pending:
            assert time.monotonic() < deadline, f"{pending} connects still pending"
            for key, _ in sel.select(0.2):
                sel.unregister(key.fileobj)
                pending -= 1
                s = key.fileobj
                assert isinstance(s, socket.socket)
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                if key.data % partial_every == 1:
                    try:
                        s.send(b"GET /status.json HTTP/1.1\r\nHost: x\r\n")  # never finished
                    except OSError:
                        pass  # already closed at the cap
        sel.close()
        wait_for(lambda: _accept_queue(port) == 0, timeout=10, what="the server to accept the wave")
    return socks


def test_5000_idle_and_half_open_connections_under_1024_open_files(start) -> None:  # type: ignore[no-untyped-def]
    _raise_own_nofile(CONNECTIONS + 1024)
    t: HttpTarget = start("--http-header-timeout", "30", "--http-idle-timeout", "30")
    resource.prlimit(t.server.pid, resource.RLIMIT_NOFILE, (SERVER_NOFILE, SERVER_NOFILE))
    t.resolve_ms()
    t.healthz_ms()
    base_fds, base_threads = t.fds(), t.threads()
    socks: list[socket.socket] = []
    try:
        socks = _open_many(t.http_port, CONNECTIONS)
        # Every connection was accepted: it holds one of the CAP slots or was closed at the cap.
        # Connections closed at the cap are released on the loop's next turn: at most one accept batch
        # (100) above the cap at any time.
        fds_peak, threads_during = t.fds(), t.threads()
        wait_for(lambda: t.fds() <= base_fds + CAP + 16, timeout=10, what="the closed connections' fds")
        fds_during = t.fds()
        resolve = [t.resolve_ms() for _ in range(5)]
        healthz, refused_probes = _probes(t, 5)
        assert all(addr == "10.0.0.1" for _, addr in resolve)
        # The static file can still be opened: a change reaches Resolve.
        write_static(t.file, _endpoints("10.0.0.2"))
        changed_at = time.monotonic()
        wait_for(lambda: t.resolve_ms(fresh=False)[1] == "10.0.0.2", timeout=10, what="the file change")
        change_ms = (time.monotonic() - changed_at) * 1000
        samples = t.metrics()
        open_http = samples[("lookaside_http_connections", ())]
        hits = samples[("lookaside_limit_hits_total", (("limit", "http_max_connections"),))]
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: t.fds() <= base_fds + 2, timeout=30, what="the attack connections to be closed")
    after_fds = t.fds()
    FIGURES["http connections"] = {
        "attack connections": CONNECTIONS,
        "server open-file limit": SERVER_NOFILE,
        "server fds before/peak/during/after": (base_fds, fds_peak, fds_during, after_fds),
        "server threads before/during": (base_threads, threads_during),
        "open HTTP connections (metric)": open_http,
        "http_max_connections hits": hits,
        "resolve ms (fresh connection)": [round(x[0], 1) for x in resolve],
        "healthz ms": [round(x, 1) for x in healthz],
        "healthz connections refused before an answer": refused_probes,
        "file change to Resolve ms": round(change_ms, 1),
    }
    print("\nHTTP connection attack:", FIGURES["http connections"])
    assert hits >= CONNECTIONS - CAP
    assert fds_peak <= base_fds + CAP + ACCEPT_BATCH + 16, fds_peak
    assert threads_during <= base_threads + 2, threads_during  # no thread per connection
    assert open_http <= CAP
    assert statistics.median(x[0] for x in resolve) < FAST_MS, resolve
    assert statistics.median(healthz) < FAST_MS, healthz
    assert t.server.alive()
    assert t.server.errors_logged() == [], t.server.errors_logged()[:5]


def _read_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Read until the server closes the connection (or ``timeout``)."""
    s.settimeout(timeout)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return got


def test_slow_headers_and_idle_connections_are_cut_off(start) -> None:  # type: ignore[no-untyped-def]
    t: HttpTarget = start("--http-header-timeout", "0.5", "--http-idle-timeout", "0.5")
    slow = [socket.create_connection(("127.0.0.1", t.http_port), timeout=5) for _ in range(20)]
    for i, s in enumerate(slow):
        if i % 2:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the blank line never comes
    idle = socket.create_connection(("127.0.0.1", t.http_port), timeout=5)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # answered, then kept alive
    start_at = time.monotonic()
    try:
        for s in slow:
            assert _read_all(s) == b""  # closed without an answer
        answer = _read_all(idle)
        closed_in = time.monotonic() - start_at
    finally:
        for s in [*slow, idle]:
            s.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\n")
    assert closed_in < 4.0, closed_in
    assert t.limit_hits("http_header_timeout") == 20
    assert t.healthz_ms() < 1000


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        return _read_all(s)


def test_request_bodies_are_rejected_and_never_read_as_requests(start) -> None:  # type: ignore[no-untyped-def]
    t: HttpTarget = start()
    smuggled = b"GET /status.json HTTP/1.1\r\nHost: x\r\n\r\n"
    # A POST whose body is itself a request: one 405, then the connection closes; the body is not served.
    got = _exchange(
        t.http_port,
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled,
    )
    assert got.startswith(b"HTTP/1.1 405") and got.count(b"HTTP/1.1") == 1, got
    assert b"Allow: GET, HEAD" in got and b"application/json" not in got
    # A GET with a body (by length or chunked): 413, closed.
    for framing in (
        b"Content-Length: 5\r\n\r\nhello",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ):
        got = _exchange(t.http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + framing + smuggled)
        assert got.startswith(b"HTTP/1.1 413") and got.count(b"HTTP/1.1") == 1, got
    # Pipelined body-less requests are all answered, in order; HEAD gets headers only.
    got = _exchange(
        t.http_port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nHEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert got.count(b"HTTP/1.1 200") == 3 and got.count(b"ok\n") == 2, got
    assert got.count(b"Content-Length: 3") == 3
    # Oversized header lines: 400, not buffered.
    got = _exchange(t.http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    assert got.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), got[:100]
    assert t.healthz_ms() < 1000
    assert t.server.errors_logged() == [], t.server.errors_logged()[:5]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_out_of_file_descriptors_the_listener_pauses_and_recovers(start) -> None:  # type: ignore[no-untyped-def]
    """Below the connection cap but out of descriptors (EMFILE): accepting pauses (no busy loop, no crash)
    and resumes once descriptors are free again."""
    t: HttpTarget = start("--http-header-timeout", "30")
    t.healthz_ms()
    limit = t.fds() + 40
    resource.prlimit(t.server.pid, resource.RLIMIT_NOFILE, (limit, limit))
    socks = [socket.create_connection(("127.0.0.1", t.http_port), timeout=5) for _ in range(100)]
    try:
        wait_for(lambda: t.fds() >= limit - 1, timeout=10, what="the server to run out of descriptors")
        cpu = _cpu_seconds(t.server.pid)
        window = time.monotonic()
        time.sleep(1.0)  # a measurement window, not synchronisation: the server is stuck at EMFILE meanwhile
        busy = (_cpu_seconds(t.server.pid) - cpu) / (time.monotonic() - window)
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: t.fds() < limit - 30, timeout=10, what="the connections to be released")
    # Accepting resumed: a new connection gets its answer (asyncio retries accept about once a second).
    deadline = time.monotonic() + 10
    while True:
        try:
            t.healthz_ms()
            break
        except OSError:
            assert time.monotonic() < deadline, "the listener did not resume"
    FIGURES["emfile"] = {
        "server open-file limit": limit,
        "cpu share while out of descriptors": round(busy, 3),
    }
    print("\nout of descriptors:", FIGURES["emfile"])
    assert busy < 0.3, busy  # no busy accept loop
    assert t.server.alive()
    assert t.server.errors_logged() == [], t.server.errors_logged()[:5]  # one warning, no tracebacks


def test_scraping_back_to_back_gets_bounded_renders_and_grpc_keeps_being_served(start) -> None:  # type: ignore[no-untyped-def]
    """Four scrapers fetch /status.json and /metrics back to back (bounded in count and time) while Resolve
    runs: each rendering is made fresh at most --http-renders-per-second (4) times a second plus its burst,
    the others get the newest rendering again with an Age header, counted as limit hits; Resolve is served
    throughout."""
    import threading

    t: HttpTarget = start()
    stop = threading.Event()
    lock = threading.Lock()
    fresh: dict[str, int] = {"/status.json": 0, "/metrics": 0}
    reused: dict[str, int] = {"/status.json": 0, "/metrics": 0}
    failures: list[str] = []

    def scrape(path: str) -> None:
        for _ in range(400):
            if stop.is_set():
                return
            req = urllib.request.Request(f"http://127.0.0.1:{t.http_port}{path}")
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
                    aged = resp.headers.get("Age") is not None
            except OSError as e:
                failures.append(f"{path}: {e!r}")
                return
            with lock:
                (reused if aged else fresh)[path] += 1

    scrapers = [threading.Thread(target=scrape, args=(p,)) for p in ("/status.json", "/metrics") * 2]
    started = time.monotonic()
    for s in scrapers:
        s.start()
    resolves = 0
    while any(s.is_alive() for s in scrapers) and time.monotonic() - started < 8.0:
        t.resolve_ms(fresh=False)
        resolves += 1
    stop.set()
    for s in scrapers:
        s.join(15)
    seconds = time.monotonic() - started
    FIGURES["render budget"] = {
        "seconds": round(seconds, 1),
        "fresh renders": dict(fresh),
        "answered again (Age)": dict(reused),
        "resolves during the scraping": resolves,
    }
    print("\nrender budget:", FIGURES["render budget"])
    assert not failures, failures[:3]
    for path in fresh:
        # at most 4 renders a second plus the burst of 4; the two scrapers of a path may share each one
        assert fresh[path] <= 2 * (4 * seconds + 4), (path, fresh[path], seconds)
        assert reused[path] > 0, path
    assert resolves > 0
    # /metrics itself is under the budget: a fresh rendering shows every hit within the refill time
    wait_for(lambda: t.limit_hits("http_render_budget") >= sum(reused.values()), timeout=10, what="the hits")
    assert t.server.errors_logged() == [], t.server.errors_logged()[:5]
