"""Capacity of one lookaside replica on this machine: ``python -m benchmarks.capacity [--quick]``.

* Resolve: closed-loop grpc.aio clients at rising concurrency against one server process; calls/s, p50/p99
  and errors per step (errors at high concurrency are grpc's pending-request shedding, see the report).
* Watch: N streams open at once; server RSS per stream; and the fan-out time of one change (from the file
  write to the last stream that got it, which includes up to one poll interval of the static file).

The server runs as ``python -m lookaside_server`` (a subprocess) over a static file, the clients in this
process, so both share the machine's cores: figures are a lower bound for a replica with its own cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from lookaside_grpc import protocol as pb

POLL = 0.02


def _write(path: Path, gen: int, size: int = 3) -> None:
    data = {
        "default/greet": [
            {"ip": f"10.{gen >> 8 & 255}.{gen & 255}.{k + 1}", "port": 50051, "port_name": "grpc"}
            for k in range(size)
        ]
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class Server:
    def __init__(self, folder: Path) -> None:
        self.file = folder / "endpoints.json"
        _write(self.file, 1)
        self.log = open(folder / "server.log", "wb")  # noqa: SIM115
        env = {
            **os.environ,
            "LB_MAX_WATCHES": "1000000",
            "LB_MAX_WATCHES_PER_PEER": "1000000",
            # thousands of streams on 4 connections: above the server's per-connection stream limit
            # (rapid-reset bound, 1000) and grpc's queue of calls for the Python server (1000)
            "LB_MAX_STREAMS_PER_CONNECTION": "100000",
            "LB_MAX_PENDING_REQUESTS": "10000",
            "LB_LOG_LEVEL": "WARNING",
        }
        help_text = subprocess.run(
            [sys.executable, "-m", "lookaside_server", "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        ).stdout
        extra = []
        if "--max-watches-per-peer" in help_text:
            extra += ["--max-watches-per-peer", "1000000"]
        if re.search(r"--max-watches\b(?!-)", help_text):
            extra += ["--max-watches", "1000000"]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lookaside_server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--http-port",
                "-1",
                "--static-file",
                str(self.file),
                "--poll-interval",
                str(POLL),
                "--no-xds",
                "--log-level",
                "INFO",
                *extra,
            ],
            stdout=self.log,
            stderr=self.log,
            env=env,
        )
        deadline = time.monotonic() + 20
        while True:
            m = re.search(r"listening on \S*:(\d+)", (folder / "server.log").read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("lookaside server did not start")
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_kb(self, key: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def resolve_step(stubs: list[pb.LookasideStub], concurrency: int, seconds: float) -> dict[str, object]:
    lat: list[float] = []
    errors: dict[str, int] = {}
    end = time.monotonic() + seconds

    async def worker(i: int) -> None:
        stub = stubs[i % len(stubs)]
        req = pb.Request(service="greet", namespace="default", router=pb.ROUNDROBIN)
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                await stub.Resolve(req, timeout=30)
                lat.append(time.perf_counter() - t)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1

    start = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    took = time.monotonic() - start
    lat.sort()
    q = (lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2)) if lat else (lambda p: None)
    return {
        "concurrency": concurrency,
        "calls/s": round(len(lat) / took),
        "p50 ms": q(0.5),
        "p99 ms": q(0.99),
        "errors": errors,
    }


async def watch_step(server: Server, stubs: list[pb.LookasideStub], n: int, gen: int) -> dict[str, object]:
    before = server.rss_kb()
    got: dict[int, float] = {}
    opened = 0
    errors: dict[str, int] = {}
    target_version = {"v": 0}
    done = asyncio.Event()

    failed = 0

    async def one(i: int, ready: asyncio.Event) -> None:
        nonlocal opened, failed
        call = stubs[i % len(stubs)].Watch(pb.WatchRequest(service="greet", namespace="default"))
        try:
            msg = await call.read()
            opened += 1
            if opened + failed >= batch_end["n"]:
                ready.set()
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                if msg.version >= target_version["v"] > 0 and i not in got:
                    got[i] = time.perf_counter()
                    if len(got) == n:
                        done.set()
        except grpc.aio.AioRpcError as e:
            if i not in got and e.code() is not grpc.StatusCode.CANCELLED or opened + failed < n:
                failed += 1
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
                if opened + failed >= batch_end["n"]:
                    ready.set()
        finally:
            call.cancel()

    # open in batches of 500 (a burst of thousands is shed by grpc: see max_pending_requests in the report)
    tasks: list[asyncio.Task[None]] = []
    batch_end = {"n": 0}
    t_open = time.perf_counter()
    for start in range(0, n, 500):
        ready = asyncio.Event()
        batch_end["n"] = min(n, start + 500)
        tasks += [asyncio.create_task(one(i, ready)) for i in range(start, batch_end["n"])]
        await asyncio.wait_for(ready.wait(), 60)
    open_s = time.perf_counter() - t_open
    await asyncio.sleep(1.0)
    after = server.rss_kb()
    resp = await stubs[0].Resolve(pb.Request(service="greet", namespace="default"), timeout=10)
    target_version["v"] = resp.version + 1
    t0 = time.perf_counter()
    _write(server.file, gen)
    try:
        await asyncio.wait_for(done.wait(), 60)
    except TimeoutError:
        pass
    fan = sorted(t - t0 for t in got.values())
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "streams": n,
        "opened": opened,
        "open all s": round(open_s, 2),
        "errors": errors,
        "rss before MB": round(before / 1024, 1),
        "rss with streams MB": round(after / 1024, 1),
        "kB per stream": round((after - before) / max(1, n), 1),
        "got the change": len(fan),
        "fan-out first ms": round(fan[0] * 1000, 1) if fan else None,
        "fan-out p50 ms": round(fan[len(fan) // 2] * 1000, 1) if fan else None,
        "fan-out last ms": round(fan[-1] * 1000, 1) if fan else None,
    }


async def main_async(quick: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        server = Server(Path(d))
        channels = [
            grpc.aio.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(4)
        ]
        stubs = [pb.LookasideStub(c) for c in channels]
        try:
            print(f"machine: {os.cpu_count()} cores; server pid {server.proc.pid}; clients in this process\n")
            print("Resolve (closed loop, 4 HTTP/2 connections):")
            steps = (1, 16, 64, 256, 1000) if quick else (1, 16, 64, 256, 1000, 2000)
            for c in steps:
                print("  ", await resolve_step(stubs, c, 2.0 if quick else 4.0), flush=True)
            print("\nWatch (one target, one change fanned out to every stream):")
            for i, n in enumerate((1000,) if quick else (1000, 5000)):
                print("  ", await watch_step(server, stubs, n, 100 + i), flush=True)
            print(f"\nserver peak RSS (VmHWM): {server.rss_kb('VmHWM') / 1024:.0f} MB")
        finally:
            for c in channels:
                await c.close()
            server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer and shorter steps (about 20 s)")
    args = p.parse_args(argv)
    asyncio.run(main_async(args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
