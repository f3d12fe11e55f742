"""Load attack on one lookaside server process: thousands of concurrent Resolve calls in waves and hundreds of
Watch streams, while the endpoint set churns every 50 ms.

Checked: no call fails; no answer mixes two endpoint sets and every version maps to exactly one set (versions
and sets only move forward, everywhere); every Watch subscriber converges to the final set's version and
contents after the churn stops (no lost update); the server's peak RSS (VmHWM from /proc) stays bounded; the
server logs no error. The server runs as a subprocess (``python -m lookaside_server``), the clients here on
grpc.aio. Sizes can be raised with LB_ATTACK_SECONDS / LB_ATTACK_WAVE / LB_ATTACK_WATCHES.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from lookaside_dev.attack import ServerProcess, generation_of, generation_set
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb

CHURN_SECONDS = float(os.environ.get("LB_ATTACK_SECONDS", "10"))
WAVE = int(os.environ.get("LB_ATTACK_WAVE", "2500"))  # Resolve calls in flight at once
WATCHES = int(os.environ.get("LB_ATTACK_WATCHES", "250"))  # Watch streams (4/5 on the churning target)
CHURN_EVERY = 0.05
RSS_LIMIT_MB = 500
STABLE_GEN = 0xFFFF  # the stable target's addresses: 10.255.255.x
CONVERGE_WITHIN = 10.0

STABLE = generation_set(STABLE_GEN, 3)
STABLE_SET = {(e["ip"], e["port"]) for e in STABLE}
RESULTS: dict[str, object] = {}


@dataclass
class Observed:
    """Everything the clients saw, checked as it arrives."""

    version_gen: dict[int, int] = field(default_factory=dict)  # churn target: version -> generation
    problems: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    resolves: int = 0
    watch_messages: int = 0

    def saw(self, where: str, version: int, ips: list[str]) -> None:
        gens = {generation_of(ip) for ip in ips}
        if len(gens) != 1:
            self.problems.append(f"{where}: version {version} mixes generations {sorted(gens)}")
            return
        gen = gens.pop()
        known = self.version_gen.setdefault(version, gen)
        if known != gen:
            self.problems.append(f"{where}: version {version} was generation {known}, now {gen}")


def limit_args() -> tuple[list[str], dict[str, str]]:
    """Raise the per-peer and overall Watch limits (every client here is one peer, 127.0.0.1) by flag if the
    server has the flags, and by environment variable anyway."""
    # The waves put WAVE Resolves in flight at once from one process on 4 connections: more than grpc's own
    # queue of calls for the Python server (--max-pending-requests, 1000) and the server's HTTP/2 streams per
    # connection (--max-streams-per-connection, 256) allow, so this test raises those too.
    env = {
        "LB_MAX_WATCHES": "100000",
        "LB_MAX_WATCHES_PER_PEER": "100000",
        "LB_MAX_PENDING_REQUESTS": "10000",
        "LB_MAX_STREAMS_PER_CONNECTION": "100000",
    }
    help_text = subprocess.run(
        [sys.executable, "-m", "lookaside_server", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    args = []
    if "--max-watches-per-peer" in help_text:
        args += ["--max-watches-per-peer", "100000"]
    if re.search(r"--max-watches\b(?!-)", help_text):
        args += ["--max-watches", "100000"]
    return args, env


async def watcher(
    stub: pb.LookasideStub,
    service: str,
    seen: Observed,
    last: dict[int, pb.EndpointSet],
    idx: int,
    stop: asyncio.Event,
) -> None:
    call = stub.Watch(pb.WatchRequest(service=service, namespace="default"))
    prev = 0
    try:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                if not stop.is_set():
                    seen.problems.append(f"watch {idx} ended early")
                return
            seen.watch_messages += 1
            if msg.version <= prev:
                seen.problems.append(f"watch {idx}: version {msg.version} after {prev}")
            prev = msg.version
            ips = [e.ip for e in msg.endpoints]
            if service == "churn":
                seen.saw(f"watch {idx}", msg.version, ips)
            elif {(e.ip, e.port) for e in msg.endpoints} != STABLE_SET or msg.version != 1:
                seen.problems.append(f"watch {idx}: the stable target changed: {msg}")
            last[idx] = msg
    except grpc.aio.AioRpcError as e:
        if not (stop.is_set() and e.code() is grpc.StatusCode.CANCELLED):
            seen.errors[f"watch {e.code().name}: {e.details()}"] += 1
    except asyncio.CancelledError:
        call.cancel()
        raise


async def one_resolve(stub: pb.LookasideStub, rng: random.Random, seen: Observed) -> None:
    service = "churn" if rng.random() < 0.8 else "stable"
    router = pb.ROUNDROBIN if rng.random() < 0.5 else pb.RANDOM
    try:
        resp = await stub.Resolve(
            pb.Request(service=service, namespace="default", router=router, count=rng.randint(1, 3)),
            timeout=30,
        )
    except grpc.aio.AioRpcError as e:
        seen.errors[f"resolve {e.code().name}: {e.details()}"] += 1
        return
    seen.resolves += 1
    ips = [e.ip for e in resp.endpoints]
    if service == "churn":
        seen.saw("resolve", resp.version, ips)
    elif not {(e.ip, e.port) for e in resp.endpoints} <= STABLE_SET or resp.version != 1:
        seen.problems.append(f"resolve: the stable target changed: {resp}")


async def test_thousands_of_resolves_and_hundreds_of_watches_under_churn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(5)
    path = tmp_path / "endpoints.json"
    gen = 1
    written: dict[int, list[dict[str, object]]] = {}
    write_static(path, {"default/churn": generation_set(gen, 4), "default/stable": STABLE})
    args, env = limit_args()
    for k, v in env.items():  # restored at teardown: later tests' servers must get the default limits
        if k not in os.environ:
            monkeypatch.setenv(k, v)
    server = ServerProcess(path, tmp_path / "server.log", poll_interval=0.02, extra=args).start()
    channels = [
        grpc.aio.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    stubs = [pb.LookasideStub(c) for c in channels]
    seen = Observed()
    last: dict[int, pb.EndpointSet] = {}
    stop = asyncio.Event()
    rss: list[int] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        base = server.memory_kb()
        for i in range(WATCHES):
            service = "stable" if i % 5 == 4 else "churn"
            tasks.append(asyncio.create_task(watcher(stubs[i % 4], service, seen, last, i, stop)))
        deadline = time.monotonic() + 15
        while len(last) < WATCHES:  # every stream got its first set
            assert time.monotonic() < deadline, f"{len(last)}/{WATCHES} watches started; {seen.errors}"
            await asyncio.sleep(0.05)

        async def churn() -> None:
            nonlocal gen
            end = time.monotonic() + CHURN_SECONDS
            while time.monotonic() < end:
                gen += 1
                written[gen] = generation_set(gen, rng.randint(1, 8))
                write_static(path, {"default/churn": written[gen], "default/stable": STABLE})
                await asyncio.sleep(CHURN_EVERY)

        async def sample_memory() -> None:
            while not stop.is_set():
                rss.append(server.memory_kb()["VmRSS"])
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_memory())
        churner = asyncio.create_task(churn())
        started, waves, in_flight_max = time.monotonic(), 0, 0
        while not churner.done():
            calls = [one_resolve(stubs[k % 4], rng, seen) for k in range(WAVE)]
            in_flight_max = max(in_flight_max, len(calls))
            await asyncio.gather(*calls)
            waves += 1
        load_seconds = time.monotonic() - started
        await churner

        # after the churn: the server serves the last generation, and every watcher gets there
        final = gen
        final_set = {(e["ip"], e["port"]) for e in written[final]}
        settle = time.monotonic() + CONVERGE_WITHIN
        final_version = 0
        while True:
            resp = await stubs[0].Resolve(
                pb.Request(service="churn", namespace="default", count=8), timeout=5
            )
            if generation_of(resp.endpoints[0].ip) == final:
                final_version = resp.version
                break
            assert time.monotonic() < settle, f"server did not converge to generation {final}"
            await asyncio.sleep(0.02)
        churn_ids = [i for i in range(WATCHES) if i % 5 != 4]
        lagging: list[int] = []
        while True:
            lagging = [i for i in churn_ids if last[i].version != final_version]
            if not lagging or time.monotonic() > settle:
                break
            await asyncio.sleep(0.02)
        converged_in = CONVERGE_WITHIN - (settle - time.monotonic())
        stop.set()
        await sampler
        mem = server.memory_kb()
        assert server.alive(), server.tail()
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in channels:
            await c.close()
        code = server.stop()
    errors_logged = server.errors_logged()
    stats = {
        "churn seconds": CHURN_SECONDS,
        "generations written": gen - 1,
        "versions seen": len(seen.version_gen),
        "resolve calls": seen.resolves,
        "resolve waves": waves,
        "in flight per wave": in_flight_max,
        "resolves/s": round(seen.resolves / load_seconds),
        "watch streams": WATCHES,
        "watch messages": seen.watch_messages,
        "errors": dict(seen.errors),
        "problems": len(seen.problems),
        "converged in s": round(converged_in, 2),
        "rss start MB": base["VmRSS"] // 1024,
        "rss max sampled MB": max(rss) // 1024,
        "peak rss (VmHWM) MB": mem["VmHWM"] // 1024,
        "exit code": code,
    }
    RESULTS.update(stats)
    print("\nload attack:", stats)
    assert not seen.problems, seen.problems[:10]
    assert not lagging, [(i, last[i].version) for i in lagging[:10]]
    for i in churn_ids:
        assert {(e.ip, e.port) for e in last[i].endpoints} == final_set and last[i].version == final_version
    assert all(last[i].version == 1 for i in range(WATCHES) if i % 5 == 4)
    versions = sorted(seen.version_gen.items())  # versions and generations move forward together
    assert all(a[1] < b[1] for a, b in zip(versions, versions[1:], strict=False)), versions[:20]
    assert mem["VmHWM"] < RSS_LIMIT_MB * 1024, f"peak RSS {mem['VmHWM'] // 1024} MB"
    assert errors_logged == [], errors_logged[:10]
    assert code == 0, server.tail()
    if gen - 1 < 50:
        pytest.fail(f"only {gen - 1} changes written: the churn did not run")
    # Last, as it has a known cause: grpc core cancels calls arriving while more than
    # grpc.server.max_pending_requests (default 1000) wait for the Python server to pick them up, so a burst
    # of thousands of Resolves gets CANCELLED unless the server raises it (Limits.max_pending_requests).
    assert not seen.errors, (
        f"{sum(seen.errors.values())} of {seen.resolves + sum(seen.errors.values())} "
        f"calls failed: {dict(seen.errors)} (CANCELLED: see grpc.server.max_pending_requests)"
    )
