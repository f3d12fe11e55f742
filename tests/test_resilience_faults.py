"""Fault scenarios shared by the channel factory and the interceptor: lookaside killed and restarted, backend
killed and restarted, a lookaside that never answers, staleness, per_call throttling and pick cache, stats."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

import lookaside_grpc
from examples.greet import greet_pb2_grpc
from examples.greet.server import serve
from lookaside_dev.fakes import Backends, RunningLookaside, req, wait_until
from lookaside_dev.static_files import write_addresses
from lookaside_server import ListenConfig, ServerConfig, StaticFileConfig, run_in_thread

ROUTES = {"greet.GreetService": lookaside_grpc.Target("greet", "default")}
FAILED: dict[str, int] = {}  # scenario -> failed calls, printed at the end (pytest -s)


class Load:
    """Threads calling ``fn`` until stopped; failures collected. Bounded by ``limit`` calls per thread."""

    def __init__(self, fn: Callable[[], object], threads: int = 4, limit: int = 20000) -> None:
        self.ok = 0
        self.errors: list[BaseException] = []
        self.started: list[float] = []  # start time of each failed call
        self._stop = threading.Event()
        self._lock = threading.Lock()

        def run() -> None:
            for _ in range(limit):
                if self._stop.is_set():
                    return
                started = time.monotonic()
                try:
                    fn()
                    with self._lock:
                        self.ok += 1
                except BaseException as e:  # noqa: BLE001 - collected and asserted
                    with self._lock:
                        self.errors.append(e)
                        self.started.append(started)

        self._threads = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def wait_calls(self, n: int, timeout: float = 10.0) -> None:
        target = self.ok + n
        wait_until(lambda: self.ok >= target, timeout)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


@pytest.fixture
def three() -> Iterator[Backends]:
    with Backends(3) as b:
        yield b


def _start_lookaside(path: Path, port: int = 0):  # type: ignore[no-untyped-def]
    return run_in_thread(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=port, grace=0.1),
            source=StaticFileConfig(path, poll_interval=0.02),
        )
    )


@pytest.mark.parametrize("client", ["channel", "interceptor"])
def test_lookaside_killed_and_restarted_on_the_same_port(
    three: Backends, tmp_path: Path, client: str
) -> None:
    path = tmp_path / "endpoints.json"
    write_addresses(path, {"default/greet": three.addresses})
    server = _start_lookaside(path)
    port = server.port
    with Backends(1) as orig:
        if client == "channel":
            ch: grpc.Channel = lookaside_grpc.channel("greet", lookaside=f"127.0.0.1:{port}")
            closer: Callable[[], None] = ch.close
        else:
            icpt = lookaside_grpc.LookasideInterceptor(f"127.0.0.1:{port}", ROUTES)
            ch, closer = grpc.intercept_channel(grpc.insecure_channel(orig.addresses[0]), icpt), icpt.close
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        stub.Greet(req(), timeout=5)
        load = Load(lambda: stub.Greet(req(), timeout=5))
        try:
            load.wait_calls(50)
            server.stop()  # the lookaside dies mid-run
            load.wait_calls(200)
            write_addresses(path, {"default/greet": three.addresses[:1]})
            server = _start_lookaside(path, port)  # back on the same port, with a new set
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the new set arrives: only backend 0 gets calls
                snap = three.calls()
                time.sleep(0.2)
                if three.calls()[1:] == snap[1:] and three.calls()[0] > snap[0]:
                    break
            else:
                raise AssertionError("the client did not pick up the restarted lookaside's set")
            load.wait_calls(50)
        finally:
            load.stop()
            closer()
            server.stop()
        FAILED[f"lookaside killed ({client})"] = len(load.errors)
        assert load.errors == []
        assert orig.calls() == [0]


@pytest.mark.parametrize("client", ["channel", "interceptor"])
def test_backend_killed_is_retried_ejected_and_readmitted(three: Backends, client: str) -> None:
    with RunningLookaside(three.addresses) as la, Backends(1) as orig:
        if client == "channel":
            ch: grpc.Channel = lookaside_grpc.channel("greet", lookaside=la.address)
            closer: Callable[[], None] = ch.close
            stats = ch.stats  # type: ignore[attr-defined]
        else:
            icpt = lookaside_grpc.LookasideInterceptor(la.address, ROUTES)
            ch, closer, stats = (
                grpc.intercept_channel(grpc.insecure_channel(orig.addresses[0]), icpt),
                icpt.close,
                icpt.stats,
            )
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        load = Load(lambda: stub.Greet(req(), timeout=5))
        dead = three.addresses[0]
        dead_port = int(dead.rsplit(":", 1)[1])
        try:
            load.wait_calls(60)
            three.servers[0].stop(None).wait(5)  # the backend dies mid-run (still listed)
            killed_at = time.monotonic()  # calls started before this may have been in flight on it
            wait_until(lambda: stats().ejections.get(dead, 0) >= 1)
            load.wait_calls(100)
            # while ejected, the dead address is not picked
            picks = stats().picks.get(dead, 0)
            load.wait_calls(50)
            assert stats().picks.get(dead, 0) <= picks + 8  # at most the calls in flight at the ejection
            server, servicer, _ = serve(port=dead_port)  # back on the same port
            try:
                wait_until(lambda: servicer.calls > 10, timeout=40)  # picked again after its cool-down
            finally:
                load.stop()
                server.stop(None)
            st = stats()
        finally:
            load.stop()
            closer()
        in_flight = [e for e, t in zip(load.errors, load.started, strict=True) if t < killed_at]
        not_sent = [e for e, t in zip(load.errors, load.started, strict=True) if t >= killed_at]
        FAILED[f"backend killed ({client}): started after the kill"] = len(not_sent)
        FAILED[f"backend killed ({client}): in flight at the kill"] = len(in_flight)
        assert not_sent == []
        assert all(e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE) for e in in_flight)
        assert st.retries >= 1 and st.ejections.get(dead, 0) >= 1
        assert orig.calls() == [0]


@pytest.fixture
def hanging_lookaside() -> Iterator[str]:
    """A TCP listener that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    t.join(5)
    for c in conns:
        c.close()
    sock.close()


@pytest.mark.parametrize("mode", ["watch", "per_call"])
def test_hanging_lookaside_cannot_hang_calls(hanging_lookaside: str, mode: str) -> None:
    failed = 0
    with Backends(1) as orig:
        with lookaside_grpc.LookasideInterceptor(hanging_lookaside, ROUTES, mode=mode) as icpt:
            stub = greet_pb2_grpc.GreetServiceStub(
                grpc.intercept_channel(grpc.insecure_channel(orig.addresses[0]), icpt)
            )
            for timeout in (0.6, None):
                start = time.monotonic()
                try:
                    assert stub.Greet(req(), timeout=timeout).result.endswith(orig.addresses[0])
                except grpc.RpcError:
                    failed += 1
                assert time.monotonic() - start < (timeout or 1.0) + 0.5
        with lookaside_grpc.channel("greet", lookaside=hanging_lookaside, mode=mode, init_timeout=0.5) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            for timeout in (0.5, None):
                start = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    stub.Greet(req(), timeout=timeout)
                assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                assert time.monotonic() - start < 0.5 + 0.5
    FAILED[f"hanging lookaside, interceptor ({mode})"] = failed
    assert failed == 0


def test_max_staleness_fails_the_channel_and_falls_back_in_the_interceptor(three: Backends) -> None:
    with Backends(1) as orig:
        la = RunningLookaside(three.addresses)
        ch = lookaside_grpc.channel("greet", lookaside=la.address, max_staleness=0.3)
        icpt = lookaside_grpc.LookasideInterceptor(la.address, ROUTES, max_staleness=0.3, route_wait=0.2)
        try:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            istub = greet_pb2_grpc.GreetServiceStub(
                grpc.intercept_channel(grpc.insecure_channel(orig.addresses[0]), icpt)
            )
            stub.Greet(req(), timeout=5)
            istub.Greet(req(), timeout=5)
            la.stop()
            for _ in range(5):  # the last set keeps serving meanwhile
                stub.Greet(req(), timeout=5)
            wait_until(lambda: ch._balancer.resolver.state.stale, 5)  # type: ignore[attr-defined]
            with pytest.raises(grpc.RpcError) as err:
                stub.Greet(req(), timeout=1)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE and "stale" in err.value.details()
            assert istub.Greet(req(), timeout=1).result.endswith(orig.addresses[0])
            assert icpt.stats().fallbacks.get("stale", 0) >= 1
        finally:
            ch.close()
            icpt.close()


def test_per_call_throttles_resolves_and_rotates_over_the_last_picks(three: Backends) -> None:
    with RunningLookaside(three.addresses) as la:
        with lookaside_grpc.channel("greet", lookaside=la.address, mode="per_call") as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            for _ in range(6):
                stub.Greet(req(), timeout=5)
            assert la.servicer.stats()["resolve"] == 6
            la.servicer.resolve_error = (grpc.StatusCode.UNAVAILABLE, "lookaside overloaded")
            before = three.calls()
            for _ in range(200):
                stub.Greet(req(), timeout=5)  # never fails: local rotation over the last known set
            resolves = la.servicer.stats()["resolve"] - 6
            assert resolves < 60, resolves  # adaptive throttling kept most Resolves local
            assert all(after - b > 30 for after, b in zip(three.calls(), before, strict=True))
            st = ch.stats()
            assert st.fallbacks["throttled"] + st.fallbacks["local_rotation"] == 200
            assert st.fallbacks["throttled"] >= 140
            assert st.resolve_failures == resolves
            la.servicer.resolve_error = None


def test_per_call_pick_cache(three: Backends) -> None:
    with RunningLookaside(three.addresses) as la:
        with lookaside_grpc.channel(
            "greet", lookaside=la.address, mode=lookaside_grpc.PerCall(batch=3, pick_cache_ttl=30)
        ) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            for _ in range(30):
                stub.Greet(req(), timeout=5)
            assert la.servicer.stats()["resolve"] == 1
            assert three.calls() == [10, 10, 10]
        with lookaside_grpc.channel(
            "greet", lookaside=la.address, mode=lookaside_grpc.PerCall(pick_cache_ttl=0.05)
        ) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            stub.Greet(req(), timeout=5)
            n = la.servicer.stats()["resolve"]
            wait_until(lambda: (stub.Greet(req(), timeout=5), la.servicer.stats()["resolve"] > n)[1], 5)


def test_stats_and_prometheus_export(three: Backends) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    with RunningLookaside(three.addresses) as la, lookaside_grpc.channel("greet", lookaside=la.address) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        for _ in range(9):
            stub.Greet(req(), timeout=5)
        three.servers[2].stop(None).wait(5)
        for _ in range(9):
            stub.Greet(req(), timeout=5)
        st = ch.stats()
        assert sum(st.picks.values()) >= 18 and st.retries >= 1 and st.ejections == {three.addresses[2]: 1}
        assert lookaside_grpc.stats()["greet.default"].retries >= 1
        registry = prometheus_client.CollectorRegistry()
        lookaside_grpc.register_prometheus(registry)
        lookaside_grpc.register_prometheus(registry)  # idempotent
        text = prometheus_client.generate_latest(registry).decode()
        for name in (
            "lookaside_grpc_picks_total",
            "lookaside_grpc_fallbacks_total",
            "lookaside_grpc_ejections_total",
            "lookaside_grpc_retries_total",
        ):
            assert name in text
        assert (
            f'lookaside_grpc_ejections_total{{endpoint="{three.addresses[2]}",target="greet.default"}} 1.0'
            in text
        )


def test_report_failed_calls() -> None:
    print("\nfailed calls per fault scenario:", FAILED)
