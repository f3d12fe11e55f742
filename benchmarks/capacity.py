"""Capacity of one lookaside replica on this machine: ``python -m benchmarks.capacity [--quick]``.

* **Fan-out**: N Watch streams (or N raw xDS/ADS streams subscribed to the target's ClusterLoadAssignment)
  on one target of E endpoints, for N in 1,000 / 10,000 and E in 100 / 5,000: time to open them all, server
  RSS per stream, and the fan-out of one change (from the file write to the first, median and last stream
  that got it; includes up to one poll interval of the static file). Streams are opened by client processes
  of 2,500 streams each (8 HTTP/2 connections per process), with the server's per-peer, per-connection and
  pending-call limits raised for the run. Clients read messages as raw bytes (no parsing), so the client side
  costs as little CPU as it can. Every cell is capped in time (``--cap``): a cell that runs out reports how
  far it got.
* **Resolve/s**: closed-loop grpc.aio clients at rising concurrency on an idle server; then at concurrency 64
  while the server is busy: an HTTP client fetching ``/status.json`` and ``/metrics`` in a loop, 1,000 xDS
  and 1,000 Watch streams open, and one endpoint change of another 100-endpoint target every second fanned out
  to all of them.

The server runs as ``python -m lookaside_server`` (a subprocess) over a static file, the clients in other
processes on the same cores: figures are a lower bound for a replica with cores of its own. Results are
printed and written to ``benchmarks/results/capacity.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from lookaside_grpc import protocol as pb

POLL = 0.02
SERVICE, NAMESPACE, PORT = "greet", "default", 50051
EDS_NAME = f"{SERVICE}.{NAMESPACE}:{PORT}"  # the canonical ClusterLoadAssignment (service.namespace:port)
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
WATCH_METHOD = "/lookaside.Lookaside/Watch"
STREAMS_PER_WORKER = 2500
CONNECTIONS_PER_WORKER = 8
OPEN_BATCH = 250


def endpoints(gen: int, size: int) -> list[dict[str, Any]]:
    """``size`` endpoints on port 50051 ("grpc"), distinct per generation ``gen``."""
    return [
        {"ip": f"10.{gen & 255}.{k // 250}.{k % 250 + 1}", "port": PORT, "port_name": "grpc"}
        for k in range(size)
    ]


def write_file(path: Path, targets: dict[str, list[dict[str, Any]]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(targets))
    os.replace(tmp, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One lookaside server process over a static file, limits raised for thousands of streams."""

    def __init__(self, folder: Path, size: int, http: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.file = folder / "endpoints.json"
        self.targets: dict[str, list[dict[str, Any]]] = {f"{NAMESPACE}/{SERVICE}": endpoints(1, size)}
        write_file(self.file, self.targets)
        self.log_path = folder / "server.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.http_port = _free_port() if http else -1
        env = {**os.environ, "LB_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lookaside_server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(self.http_port),
                "--static-file",
                str(self.file),
                "--poll-interval",
                str(POLL),
                "--log-level",
                "INFO",
                # thousands of streams from one IP on a few connections: raise the per-peer and total stream
                # limits, the per-connection stream limit (rapid-reset bound) and grpc's pending-call queue
                "--max-watches",
                "1000000",
                "--max-watches-per-peer",
                "1000000",
                "--max-streams-per-connection",
                "100000",
                "--max-pending-requests",
                "100000",
                "--max-message-bytes",
                str(4 << 20),
                *extra,
            ],
            stdout=self.log,
            stderr=self.log,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            m = re.search(r"listening on \S*:(\d+)", self.log_path.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"lookaside server did not start:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_target(self, key: str, eps: list[dict[str, Any]]) -> None:
        self.targets[key] = eps
        write_file(self.file, self.targets)

    def rss_kb(self, key: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        self.log.close()


# ---------------------------------------------------------------------------------- stream client worker


def _requests_bytes(kind: str, service: str) -> bytes:
    if kind == "watch":
        return pb.WatchRequest(service=service, namespace=NAMESPACE).SerializeToString()
    from envoy.service.discovery.v3 import discovery_pb2

    name = f"{service}.{NAMESPACE}:{PORT}"
    req = discovery_pb2.DiscoveryRequest(type_url=EDS, resource_names=[name])
    req.node.id = f"capacity-{os.getpid()}"
    req.node.cluster = "capacity"
    return req.SerializeToString()


async def worker_main(kind: str, address: str, n: int, service: str, deadline: float) -> None:
    """Open ``n`` streams (raw bytes, no parsing), report, then time the next message on each stream after
    every ``arm`` command from the harness (stdin); one JSON line per answer on stdout. Stops opening at
    ``deadline`` (``time.monotonic()``, the same clock in every process)."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(CONNECTIONS_PER_WORKER)]
    request = _requests_bytes(kind, service)
    armed: dict[str, Any] = {"at": None, "times": {}, "done": asyncio.Event(), "want": 0}
    errors: dict[str, int] = {}
    opened = 0

    async def one(i: int, first: asyncio.Future[bool]) -> None:
        nonlocal opened
        ch = channels[i % len(channels)]
        if kind == "watch":
            call: Any = ch.unary_stream(WATCH_METHOD)(request)
        else:
            call = ch.stream_stream(ADS_METHOD)(_one_request(request))
        try:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                errors["EOF"] = errors.get("EOF", 0) + 1
                return
            opened += 1
            first.set_result(True)
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                if armed["at"] is not None and i not in armed["times"]:
                    armed["times"][i] = time.monotonic()
                    if len(armed["times"]) >= armed["want"]:
                        armed["done"].set()
        except grpc.aio.AioRpcError as e:
            if not first.done():
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
                first.set_result(False)
        except asyncio.CancelledError:
            pass
        finally:
            if not first.done():
                first.set_result(False)
            call.cancel()

    async def _one_request(data: bytes) -> Any:
        yield data
        await asyncio.Event().wait()  # keep the request side open

    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    tasks = []
    for start in range(0, n, OPEN_BATCH):
        if time.monotonic() >= deadline:
            break
        firsts = [loop.create_future() for _ in range(start, min(n, start + OPEN_BATCH))]
        tasks += [asyncio.create_task(one(start + k, f)) for k, f in enumerate(firsts)]
        await asyncio.wait(firsts, timeout=max(0.1, deadline - time.monotonic()))
    print(json.dumps({"opened": opened, "errors": errors, "open_s": time.monotonic() - t0}), flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        if cmd.get("cmd") == "arm":
            armed.update(at=time.monotonic(), times={}, done=asyncio.Event(), want=opened)
            print(json.dumps({"armed": True}), flush=True)
        elif cmd.get("cmd") == "collect":
            try:
                await asyncio.wait_for(armed["done"].wait(), max(0.0, float(cmd["timeout"])))
            except TimeoutError:
                pass
            print(json.dumps({"times": sorted(armed["times"].values())}), flush=True)
            armed["at"] = None
        else:
            break
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close(None)


class Worker:
    def __init__(self, kind: str, address: str, n: int, service: str, deadline: float) -> None:
        argv = ["--worker", kind, address, str(n), service, repr(deadline)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.capacity", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._lines: list[str] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self._lines.append(line)
                self._cv.notify_all()

    def read(self, timeout: float) -> dict[str, Any] | None:
        with self._cv:
            if not self._cv.wait_for(lambda: bool(self._lines), timeout):
                return None
            return dict(json.loads(self._lines.pop(0)))

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def stop(self) -> None:
        self.send(cmd="quit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)


def open_streams(kind: str, address: str, n: int, service: str, deadline: float) -> tuple[list[Worker], dict]:
    workers = [
        Worker(kind, address, min(STREAMS_PER_WORKER, n - k), service, deadline)
        for k in range(0, n, STREAMS_PER_WORKER)
    ]
    opened, errors, open_s, missing = 0, {}, 0.0, 0
    for w in workers:
        r = w.read(max(0.1, deadline - time.monotonic()) + 15)
        if r is None:
            missing += 1
            continue
        opened += r["opened"]
        open_s = max(open_s, r["open_s"])
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return workers, {"opened": opened, "open_s": round(open_s, 2), "errors": errors, "workers_late": missing}


def fan_out(workers: list[Worker], change: Any, deadline: float) -> dict[str, Any]:
    """Arm every worker, make the change, collect when each stream got its next message."""
    for w in workers:
        w.send(cmd="arm")
    for w in workers:
        w.read(30)
    t0 = time.monotonic()
    change()
    for w in workers:
        w.send(cmd="collect", timeout=max(0.0, deadline - time.monotonic()))
    times: list[float] = []
    for w in workers:
        r = w.read(max(0.1, deadline - time.monotonic()) + 30)
        if r is not None:
            times += r["times"]
    fan = sorted(t - t0 for t in times)

    def ms(k: int) -> float | None:
        return round(fan[k] * 1000, 1) if fan else None

    return {
        "got the change": len(fan),
        "fan-out first ms": ms(0),
        "fan-out p50 ms": ms(len(fan) // 2),
        "fan-out p99 ms": ms(min(len(fan) - 1, int(len(fan) * 0.99))),
        "fan-out last ms": ms(-1),
    }


def fan_out_cell(folder: Path, kind: str, n: int, size: int, cap: float) -> dict[str, Any]:
    server = Server(folder, size)
    t_cell = time.monotonic()
    deadline = t_cell + 0.6 * cap  # opening; the change then gets 0.4 x cap
    workers: list[Worker] = []
    try:
        before = server.rss_kb()
        cpu0 = server.cpu_s()
        workers, opened = open_streams(kind, server.address, n, SERVICE, deadline)
        time.sleep(1.0)
        after = server.rss_kb()
        out: dict[str, Any] = {"kind": kind, "streams": n, "endpoints": size, **opened}
        out["rss before MB"] = round(before / 1024, 1)
        out["rss with streams MB"] = round(after / 1024, 1)
        out["kB per stream"] = round((after - before) / max(1, opened["opened"]), 1)
        if opened["opened"]:
            deadline = time.monotonic() + 0.4 * cap
            cpu1 = server.cpu_s()
            out.update(
                fan_out(
                    workers,
                    lambda: server.set_target(f"{NAMESPACE}/{SERVICE}", endpoints(2, size)),
                    deadline,
                )
            )
            out["server CPU s for the change"] = round(server.cpu_s() - cpu1, 2)
        else:
            out["got the change"] = None
            out["capped"] = True
        out["server CPU s total"] = round(server.cpu_s() - cpu0, 2)
        out["server peak RSS MB"] = round(server.rss_kb("VmHWM") / 1024, 1)
        out["cell s"] = round(time.monotonic() - t_cell, 1)
        out["capped"] = opened["opened"] < n or (out.get("got the change") or 0) < opened["opened"]
        return out
    finally:
        for w in workers:
            w.stop()
        server.stop()


# ------------------------------------------------------------------------------------------------ Resolve


async def resolve_step(address: str, concurrency: int, seconds: float) -> dict[str, Any]:
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)
    ]
    stubs = [pb.LookasideStub(c) for c in channels]
    lat: list[float] = []
    errors: dict[str, int] = {}
    end = time.monotonic() + seconds

    async def worker(i: int) -> None:
        stub = stubs[i % len(stubs)]
        req = pb.Request(service=SERVICE, namespace=NAMESPACE, router=pb.ROUNDROBIN)
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
    for c in channels:
        await c.close()
    lat.sort()

    def q(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

    return {
        "concurrency": concurrency,
        "calls/s": round(len(lat) / took),
        "p50 ms": q(0.5),
        "p99 ms": q(0.99),
        "errors": errors,
    }


def _http_load(port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    paths = ("/status.json", "/metrics")
    i = 0
    while not stop.is_set():
        path = paths[i % 2]
        i += 1
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                r.read()
            counts[path] = counts.get(path, 0) + 1
        except OSError:
            counts["errors"] = counts.get("errors", 0) + 1


def resolve_busy(folder: Path, seconds: float, streams: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Resolve/s at concurrency 64, idle and then with the HTTP listener and xDS/Watch streams busy."""
    server = Server(folder, 100, http=True, extra=extra)
    workers: list[Worker] = []
    try:
        server.set_target(f"{NAMESPACE}/churn", endpoints(50, 100))
        idle = asyncio.run(resolve_step(server.address, 64, seconds))
        deadline = time.monotonic() + 120
        for kind in ("xds", "watch"):
            ws, _ = open_streams(kind, server.address, streams, "churn", deadline)
            workers += ws
        stop = threading.Event()
        http_counts: dict[str, int] = {}
        http = threading.Thread(target=_http_load, args=(server.http_port, stop, http_counts), daemon=True)

        def churn() -> None:
            gen = 60
            while not stop.wait(1.0):
                gen += 1
                server.set_target(f"{NAMESPACE}/churn", endpoints(gen, 100))

        churner = threading.Thread(target=churn, daemon=True)
        http.start()
        churner.start()
        cpu0 = server.cpu_s()
        busy = asyncio.run(resolve_step(server.address, 64, seconds))
        cpu = server.cpu_s() - cpu0
        stop.set()
        http.join(10)
        churner.join(5)
        # then the scrapers alone (no Resolve load): the server's CPU per HTTP request
        alone: dict[str, int] = {}
        stop = threading.Event()
        http = threading.Thread(target=_http_load, args=(server.http_port, stop, alone), daemon=True)
        cpu1 = server.cpu_s()
        http.start()
        time.sleep(seconds)  # a measuring window, not synchronisation
        stop.set()
        http.join(10)
        scrape_cpu = server.cpu_s() - cpu1
        scrapes = sum(v for k, v in alone.items() if k != "errors")
        return {
            "idle": idle,
            "busy": busy,
            "busy vs idle": round(busy["calls/s"] / idle["calls/s"], 2) if idle["calls/s"] else None,
            "streams open": {"xds": streams, "watch": streams},
            "changes fanned out": int(seconds),
            "http requests/s": {k: round(v / seconds, 1) for k, v in http_counts.items()},
            "server CPU share while busy": round(cpu / seconds, 2),
            "scrapers alone: requests/s": round(scrapes / seconds, 1),
            "scrapers alone: server CPU ms per request": round(1000 * scrape_cpu / scrapes, 2)
            if scrapes
            else None,
        }
    finally:
        for w in workers:
            w.stop()
        server.stop()


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__)
    p.add_argument("--quick", action="store_true", help="1,000 streams only, short steps (about a minute)")
    p.add_argument("--cap", type=float, default=150.0, help="seconds per fan-out cell at most (default 150)")
    p.add_argument("--streams", default=None, help="comma-separated stream counts (default 1000,10000)")
    p.add_argument(
        "--endpoints", default="100,5000", help="comma-separated endpoint counts (default 100,5000)"
    )
    p.add_argument("--kinds", default="watch,xds", help="watch,xds")
    p.add_argument("--skip-resolve", action="store_true")
    p.add_argument(
        "--only-resolve-busy",
        action="store_true",
        help="only the Resolve-while-busy step, with and without "
        "the HTTP render budget (--http-renders-per-second 4 vs 1e9), same run",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "capacity.json")
    p.add_argument(
        "--worker", nargs=5, metavar=("KIND", "ADDRESS", "N", "SERVICE", "DEADLINE"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.worker:
        kind, address, n, service, deadline = args.worker
        asyncio.run(worker_main(kind, address, int(n), service, float(deadline)))
        return 0
    streams = [int(x) for x in (args.streams or ("1000" if args.quick else "1000,10000")).split(",")]
    sizes = [int(x) for x in args.endpoints.split(",")]
    kinds = args.kinds.split(",")
    results: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "python": sys.version.split()[0], "grpcio": grpc.__version__},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cap_s": args.cap,
        "fan_out": [],
    }
    print(f"machine: {os.cpu_count()} cores; server and clients share them\n", flush=True)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        if args.only_resolve_busy:
            secs = 3.0 if args.quick else 6.0
            for label, rate in (("no render budget", "1e9"), ("render budget 4/s (default)", "4")):
                r = resolve_busy(folder, secs, 1000, ("--http-renders-per-second", rate))
                print(f"Resolve while busy, {label}:", r, flush=True)
            return 0
        if not args.skip_resolve:
            print("Resolve (closed loop, 4 HTTP/2 connections, idle server):", flush=True)
            steps = (1, 16, 64, 256) if args.quick else (1, 16, 64, 256, 1000)
            server = Server(folder, 100)
            try:
                results["resolve"] = []
                for c in steps:
                    r = asyncio.run(resolve_step(server.address, c, 2.0 if args.quick else 4.0))
                    results["resolve"].append(r)
                    print("  ", r, flush=True)
            finally:
                server.stop()
            print("\nResolve at concurrency 64 while HTTP, xDS and Watch streams are busy:", flush=True)
            results["resolve_busy"] = resolve_busy(folder, 3.0 if args.quick else 6.0, 1000)
            print("  ", results["resolve_busy"], flush=True)
        print("\nFan-out (one target, one change to every stream):", flush=True)
        for kind in kinds:
            for n in streams:
                for size in sizes:
                    r = fan_out_cell(folder, kind, n, size, args.cap)
                    results["fan_out"].append(r)
                    print("  ", r, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
