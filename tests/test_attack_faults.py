"""Fault attacks under continuous load (bounded in time): the Kubernetes API down, slow and in a 410 storm
while clients Resolve; the lookaside server SIGKILLed and restarted on its port under watch-mode clients;
Greet backends killed and restarted on their port under the channel factory.

Every scenario's failed calls are collected in FAILED and printed by the last test (pytest -s)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client

import lookaside_grpc
from examples.greet import greet_pb2, greet_pb2_grpc
from examples.greet.server import serve
from lookaside_dev.attack import ServerProcess, wait_for
from lookaside_dev.kube_api import KubeAPIServer, endpoint_slice, service
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb
from lookaside_server import ListenConfig, LookasideServer, ServerConfig
from lookaside_server._sources.kubernetes import KubernetesSource, KubeTimings

FAILED: dict[str, object] = {}
TIMINGS = KubeTimings(
    resync_interval=60.0,
    watch_timeout=5.0,
    request_timeout=5.0,
    connect_timeout=1.0,
    backoff_base=0.05,
    backoff_cap=0.3,
)


def ips(msg: Any) -> list[str]:
    return sorted({e.ip for e in msg.endpoints})


# --- Kubernetes API faults ------------------------------------------------------------------------------


class Resolvers:
    """``n`` tasks calling Resolve back to back; failures and the slowest answer recorded."""

    def __init__(self, stub: pb.LookasideStub, n: int = 8) -> None:
        self.stub = stub
        self.ok = 0
        self.failures: list[str] = []
        self.slowest = 0.0
        self.last: list[str] = []
        self._stop = False
        self._tasks = [asyncio.create_task(self._run()) for _ in range(n)]

    async def _run(self) -> None:
        while not self._stop:
            start = time.monotonic()
            try:
                resp = await self.stub.Resolve(
                    pb.Request(service="greet", namespace="default", count=8, router=pb.ROUNDROBIN), timeout=5
                )
                self.ok += 1
                self.last = ips(resp)
            except grpc.aio.AioRpcError as e:
                self.failures.append(f"{e.code().name}: {e.details()}")
            self.slowest = max(self.slowest, time.monotonic() - start)
            await asyncio.sleep(0.002)

    async def until(self, want: list[str], timeout: float, what: str) -> float:
        """Wait until Resolve answers ``want``; return how long it took."""
        start = time.monotonic()
        while self.last != want:
            assert time.monotonic() - start < timeout, f"{what}: still {self.last}, want {want}"
            await asyncio.sleep(0.01)
        return time.monotonic() - start

    async def steady(self, seconds: float, want: list[str]) -> None:
        """Keep going ``seconds``; every answer meanwhile must be ``want`` (the last known set)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            assert self.last == want, self.last
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks)


def greet_slice(addresses: list[str]) -> dict[str, Any]:
    return endpoint_slice("greet-a", "greet", endpoints=addresses)


async def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kw)


async def test_kubernetes_api_down_slow_and_410_storm_under_resolve_load() -> None:
    with KubeAPIServer(bookmark_interval=0.2) as kube:
        kube.apply(service("greet"))
        kube.apply(greet_slice(["10.0.0.1", "10.0.0.2"]))
        api = client.ApiClient(client.Configuration(host=kube.url))
        source = KubernetesSource(api, kind="endpointslices", timings=TIMINGS)
        server = LookasideServer(
            ServerConfig(
                listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5),
                source=source,
            )
        )
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stub = pb.LookasideStub(channel)
        watch = stub.Watch(pb.WatchRequest(service="greet", namespace="default"))
        figures: dict[str, object] = {}
        try:
            assert ips(await watch.read()) == ["10.0.0.1", "10.0.0.2"]
            load = Resolvers(stub)
            await load.until(["10.0.0.1", "10.0.0.2"], 5, "start")

            async def watch_until(want: list[str], timeout: float = 10.0) -> None:
                async def loop() -> None:
                    while ips(await watch.read()) != want:
                        pass

                await asyncio.wait_for(loop(), timeout)

            # 1. the API goes away abruptly; it changes meanwhile; Resolve keeps answering the last known set
            await in_thread(kube.stop, abrupt=True)
            kube.apply(greet_slice(["10.0.0.2", "10.0.0.3"]))
            await load.steady(1.5, ["10.0.0.1", "10.0.0.2"])
            await in_thread(kube.start)
            figures["down: converged after restart s"] = round(
                await load.until(["10.0.0.2", "10.0.0.3"], 15, "after the API came back"), 2
            )
            await watch_until(["10.0.0.2", "10.0.0.3"])

            # 2. the API is slow (2 s per answer): still served from the cache, and the change arrives anyway
            kube.set_delay(2.0)
            await in_thread(kube.close_watches)  # the source has to re-watch through the slow API
            kube.apply(greet_slice(["10.0.0.3", "10.0.0.4"]))
            figures["slow: converged s"] = round(
                await load.until(["10.0.0.3", "10.0.0.4"], 15, "through a slow API"), 2
            )
            await watch_until(["10.0.0.3", "10.0.0.4"])
            kube.set_delay(0)

            # 3. a 410 storm: compaction and 410 ERROR events on every watch, 20 times, 100 ms apart,
            # with changes
            lists_before = kube.request_count("list")
            last: list[str] = []
            for i in range(20):
                last = [f"10.0.1.{i + 1}", f"10.0.2.{i + 1}"]
                kube.apply(greet_slice(last))
                kube.compact()
                kube.inject_watch_error(410)
                await asyncio.sleep(0.1)
            figures["410 storm: converged s"] = round(
                await load.until(sorted(last), 10, "after the 410 storm"), 2
            )
            await watch_until(sorted(last))
            figures["410 storm: re-lists"] = kube.request_count("list") - lists_before
            await load.stop()
        finally:
            watch.cancel()
            await channel.close()
            await server.stop(0.5)
            api.close()
    figures.update(
        {"resolves": load.ok, "failed": len(load.failures), "slowest resolve s": round(load.slowest, 3)}
    )
    FAILED["kubernetes API down/slow/410 storm (Resolve)"] = figures
    assert load.failures == [], load.failures[:5]
    assert load.slowest < 1.0, "a Resolve waited for the API"
    assert load.ok > 500


# --- lookaside and backend restarts ---------------------------------------------------------------------

ROUND_TIMEOUT = 5.0


class Calls:
    """Threads calling ``fn`` until stopped; each failure recorded with its start and end time."""

    def __init__(self, fns: list[Callable[[], str]], threads_per_fn: int = 2) -> None:
        self.ok = 0
        self.failures: list[tuple[float, float, str]] = []
        self.by_backend: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(fn,), daemon=True)
            for fn in fns
            for _ in range(threads_per_fn)
        ]
        for t in self._threads:
            t.start()

    def _run(self, fn: Callable[[], str]) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                backend = fn()
                with self._lock:
                    self.ok += 1
                    self.by_backend[backend] = self.by_backend.get(backend, 0) + 1
            except grpc.RpcError as e:
                with self._lock:
                    self.failures.append((start, time.monotonic(), f"{e.code().name}: {e.details()}"))  # type: ignore[attr-defined]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.by_backend)

    def wait_calls(self, n: int, timeout: float = 10.0) -> None:
        target = self.ok + n
        wait_for(lambda: self.ok >= target, timeout, f"{n} more calls")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def greet_fn(stub: greet_pb2_grpc.GreetServiceStub) -> Callable[[], str]:
    def call() -> str:
        reply = stub.Greet(
            greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="Ada")), timeout=ROUND_TIMEOUT
        )
        return reply.result.rsplit(" from ", 1)[-1]

    return call


@pytest.fixture
def greets() -> Iterator[list[list[Any]]]:
    """Three Greet backends: [server, servicer, port] each (restartable on the same port)."""
    started = [list(serve(0)) for _ in range(3)]
    yield started
    for s in started:
        s[0].stop(None).wait(5)


def only_backend_gets_calls(calls: Calls, address: str, others: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        before = calls.snapshot()
        time.sleep(0.3)
        after = calls.snapshot()
        return after.get(address, 0) > before.get(address, 0) and all(
            after.get(o, 0) == before.get(o, 0) for o in others
        )

    return check


def test_lookaside_sigkilled_and_restarted_under_watch_mode_load(
    tmp_path: Path, greets: list[list[Any]]
) -> None:
    addresses = [f"127.0.0.1:{g[2]}" for g in greets]
    path = tmp_path / "endpoints.json"

    def publish(addrs: list[str]) -> None:
        write_static(
            path, {"default/greet": [{"ip": "127.0.0.1", "port": int(a.rsplit(":", 1)[1])} for a in addrs]}
        )

    publish(addresses)
    lookaside = ServerProcess(path, tmp_path / "lookaside.log").start()
    channels = [lookaside_grpc.channel("greet", lookaside=lookaside.address) for _ in range(4)]
    calls = Calls([greet_fn(greet_pb2_grpc.GreetServiceStub(ch)) for ch in channels], threads_per_fn=2)
    restarts = 0
    try:
        calls.wait_calls(200)
        for round_, new_set in enumerate((addresses[:1], addresses)):
            lookaside.kill()  # SIGKILL: streams and connections just break
            calls.wait_calls(300)  # the clients keep calling with the last known set
            publish(new_set)
            lookaside.start()  # same port
            restarts += 1
            if len(new_set) == 1:  # the change flows to every channel: only backend 0 gets calls
                wait_for(only_backend_gets_calls(calls, new_set[0], addresses[1:]), 15, f"round {round_}")
            else:
                before = calls.snapshot()
                wait_for(
                    lambda b=before: all(calls.snapshot().get(a, 0) > b.get(a, 0) + 20 for a in addresses),
                    15,
                    f"round {round_}: every backend used again",
                )
            calls.wait_calls(200)
    finally:
        calls.stop()
        for ch in channels:
            ch.close()
        lookaside.stop()
    FAILED["lookaside SIGKILL + restart x2 (4 watch-mode channels, 8 threads)"] = {
        "calls": calls.ok,
        "failed": len(calls.failures),
    }
    assert calls.failures == [], calls.failures[:5]
    assert restarts == 2


def test_backend_restarted_on_its_port_under_channel_load(tmp_path: Path, greets: list[list[Any]]) -> None:
    addresses = [f"127.0.0.1:{g[2]}" for g in greets]
    path = tmp_path / "endpoints.json"
    write_static(path, {"default/greet": [{"ip": "127.0.0.1", "port": g[2]} for g in greets]})
    lookaside = ServerProcess(path, tmp_path / "lookaside.log").start()
    channels = [lookaside_grpc.channel("greet", lookaside=lookaside.address) for _ in range(2)]
    calls = Calls([greet_fn(greet_pb2_grpc.GreetServiceStub(ch)) for ch in channels], threads_per_fn=4)
    kills: list[tuple[float, float]] = []
    try:
        calls.wait_calls(200)
        for _ in range(3):  # backend 0 dies and comes back on the same port, three times
            victim = greets[0]
            killing = time.monotonic()
            victim[0].stop(None).wait(5)
            kills.append((killing, time.monotonic()))  # calls in flight meanwhile are cancelled
            calls.wait_calls(200)
            time.sleep(0.5)
            server, servicer, _ = serve(victim[2])
            victim[0], victim[1] = server, servicer
            wait_for(lambda s=servicer: s.calls > 20, 40, "the restarted backend is used again")
            calls.wait_calls(100)
    finally:
        calls.stop()
        for ch in channels:
            ch.close()
        lookaside.stop()

    def in_flight_at_a_kill(start: float, end: float) -> bool:
        return any(start <= k_end and end >= k_start for k_start, k_end in kills)

    stray = [f for f in calls.failures if not in_flight_at_a_kill(f[0], f[1])]
    FAILED["backend stop + restart x3 (2 channels, 8 threads)"] = {
        "calls": calls.ok,
        "failed in flight at a kill": len(calls.failures) - len(stray),
        "failed otherwise": len(stray),
    }
    assert stray == [], stray[:5]
    assert all(f[2].startswith(("UNAVAILABLE", "CANCELLED")) for f in calls.failures), calls.failures[:5]
    assert all(calls.by_backend.get(a, 0) > 0 for a in addresses)


def test_report_attack_faults() -> None:
    print("\nattack faults:", FAILED)
