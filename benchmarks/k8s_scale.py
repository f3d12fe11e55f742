"""The Kubernetes source at scale: threads, API connections, memory per Service and write-to-Watch latency.

    python -m benchmarks.k8s_scale [--services 2000] [--namespaces 20] [--cluster-wide] [--writes 40]

A Kubernetes API test server (``lookaside_dev/kube_api.py``, the real ``kubernetes`` client over HTTP on
127.0.0.1) runs in a child process holding ``--services`` Services (one EndpointSlice of three endpoints
each) spread over ``--namespaces`` namespaces. This process runs a LookasideServer on the Kubernetes source,
subscribes every Service with a Resolve, then reports:

* the process's threads (all, and the source's ``kube-watch`` ones) and its TCP connections to the API
  server, plus the watches the API server has open;
* memory per Service: the RSS growth from subscribing them all (thread stacks and allocator high-water
  marks included), and the Python objects still alive afterwards (tracemalloc), each divided by the number
  of Services;
* latency: ``--writes`` EndpointSlice writes to Services with a live Watch, from the write (in the API
  server) to the Watch update read by a gRPC client here (median, p95, max).

It runs against whatever ``lookaside_server`` is importable, so the same file measures an older tree:
``PYTHONPATH=/tmp/old:/tmp/old/server python benchmarks/k8s_scale.py`` (the source's ``cluster_wide``
option is passed only when asked for). ``--json`` prints the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import threading
import time
import tracemalloc
from contextlib import suppress
from typing import Any

APPLY, OPEN_WATCHES, REQUESTS, STOP = "apply", "open_watches", "requests", "stop"


def _slice(kube_api: Any, svc: str, ns: str, ips: list[str]) -> dict[str, Any]:
    return kube_api.endpoint_slice(
        f"{svc}-abcde", svc, namespace=ns, endpoints=ips, ports=[("grpc", 50051), ("http", 8080)]
    )


def _api_server(conn: Any, services: int, namespaces: int) -> None:
    """Child process: the API test server, driven through ``conn``."""
    from lookaside_dev import kube_api

    # 2,000 idle watches each polling for a vanished client every 50 ms would keep both cores busy in the
    # test server itself (a real API server does not poll); a slower poll only delays noticing clients that
    # leave.
    kube_api._POLL = 1.0
    kube = kube_api.KubeAPIServer(bookmark_interval=60.0, max_watch_seconds=3600)
    for i in range(services):
        ns, svc = f"ns-{i % namespaces}", f"svc-{i}"
        kube.apply(kube_api.service(svc, namespace=ns, ports=[("grpc", 50051), ("http", 8080)]))
        kube.apply(_slice(kube_api, svc, ns, [f"10.{i // 250}.{i % 250}.{j}" for j in (1, 2, 3)]))
    kube.start()
    conn.send(kube.url)
    while True:
        cmd, arg = conn.recv()
        if cmd == APPLY:
            kube.apply(arg)
            conn.send(None)
        elif cmd == OPEN_WATCHES:
            conn.send(kube.open_watch_count())
        elif cmd == REQUESTS:
            conn.send({verb: kube.request_count(verb) for verb in ("get", "list", "watch")})
        elif cmd == STOP:
            kube.stop()
            conn.send(None)
            return


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _os_threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def _tcp_connections_to(port: int) -> int:
    """Established TCP connections of this process whose remote port is ``port`` (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                remote_port = int(parts[2].rsplit(":", 1)[1], 16)
                if remote_port == port and parts[3] == "01" and parts[9] in inodes:
                    n += 1
    return n


def _server_config(source: Any) -> Any:
    import lookaside_server as ls

    if hasattr(ls, "ListenConfig"):  # nested configuration parts
        return ls.ServerConfig(
            listen=ls.ListenConfig(host="127.0.0.1", port=0, grace=0.5),
            source=source,
            http=ls.HttpConfig(port=None),
        )
    return ls.ServerConfig(host="127.0.0.1", port=0, source=source, grace=0.5)  # type: ignore[call-arg]


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    from kubernetes import client

    from lookaside_dev import kube_api
    from lookaside_grpc import protocol as pb
    from lookaside_server import LookasideServer
    from lookaside_server._sources.kubernetes import KubernetesSource

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_api_server, args=(child, args.services, args.namespaces), daemon=True)
    proc.start()
    lock = threading.Lock()

    def call(cmd: str, arg: Any = None) -> Any:
        with lock:
            parent.send((cmd, arg))
            return parent.recv()

    url = await asyncio.to_thread(parent.recv)
    api_port = int(url.rsplit(":", 1)[1])
    cfg = client.Configuration(host=url)
    cfg.connection_pool_maxsize = 64  # as lookaside_server._sources.kube_config.make_api_client
    api = client.ApiClient(cfg)
    extra: dict[str, Any] = {"cluster_wide": True} if args.cluster_wide else {}
    source = KubernetesSource(api, idle_timeout=None, max_targets=args.services + 10, **extra)
    server = LookasideServer(_server_config(source))
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb.LookasideStub(channel)
    targets = [(f"svc-{i}", f"ns-{i % args.namespaces}") for i in range(args.services)]
    out: dict[str, Any] = {
        "services": args.services,
        "namespaces": args.namespaces,
        "cluster_wide": args.cluster_wide,
        "source": source.__module__,
    }
    try:
        out["threads_idle"] = _os_threads()  # the server started, nothing subscribed
        # warm the gRPC paths up without starting any watch: an invalid name is refused before the source
        with suppress(grpc.aio.AioRpcError):
            await stub.Resolve(pb.Request(service="Not_A_Name", namespace="ns-0"), timeout=30)
        await asyncio.sleep(0.5)
        gc.collect()
        rss0, threads0 = _rss_mb(), _os_threads()
        if args.live_memory:
            tracemalloc.start()  # Python objects still alive after subscribing: what each Service keeps
        started = time.perf_counter()
        sem = asyncio.Semaphore(32)

        async def resolve(svc: str, ns: str) -> None:
            async with sem:
                await stub.Resolve(pb.Request(service=svc, namespace=ns), timeout=120)

        await asyncio.gather(*(resolve(svc, ns) for svc, ns in targets))
        out["subscribe_all_s"] = round(time.perf_counter() - started, 2)
        deadline = time.monotonic() + 120
        expected = (
            args.services
            if not hasattr(source, "watched_namespaces")
            else 2 * (1 if args.cluster_wide else min(args.namespaces, args.services))
        )
        while (open_watches := await asyncio.to_thread(call, OPEN_WATCHES)) < expected:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        gc.collect()
        live = tracemalloc.get_traced_memory()[0] if args.live_memory else 0
        tracemalloc.stop()
        rss1 = _rss_mb()
        out.update(
            threads_before=threads0,
            threads_after=_os_threads(),
            kube_watch_threads=sum(t.name.startswith("kube-watch") for t in threading.enumerate()),
            api_tcp_connections=_tcp_connections_to(api_port),
            api_open_watches=open_watches,
            api_requests=await asyncio.to_thread(call, REQUESTS),
            rss_before_mb=round(rss0, 1),
            rss_after_mb=round(rss1, 1),
            kb_per_service=round((rss1 - rss0) * 1024 / args.services, 1),
            live_kb_per_service=round(live / 1024 / args.services, 1) if args.live_memory else None,
        )
        # write -> Watch latency on Services that have a live Watch
        rng = random.Random(7)
        sample = rng.sample(range(args.services), min(args.writes, args.services))
        latencies = []
        for n, i in enumerate(sample):
            svc, ns = targets[i]
            stream = stub.Watch(pb.WatchRequest(service=svc, namespace=ns), timeout=60)
            await stream.read()  # the current state
            new_ip = f"10.250.{n // 250}.{n % 250}"
            obj = _slice(kube_api, svc, ns, [f"10.{i // 250}.{i % 250}.1", new_ip])
            t0 = time.perf_counter()
            await asyncio.to_thread(call, APPLY, obj)
            while True:
                msg: Any = await asyncio.wait_for(stream.read(), 30)
                if any(e.ip == new_ip for e in msg.endpoints):
                    break
            latencies.append((time.perf_counter() - t0) * 1000)
            stream.cancel()
        latencies.sort()
        out.update(
            write_to_watch_ms_median=round(statistics.median(latencies), 2),
            write_to_watch_ms_p95=round(latencies[int(0.95 * (len(latencies) - 1))], 2),
            write_to_watch_ms_max=round(latencies[-1], 2),
        )
    finally:
        await channel.close()
        stop_started = time.perf_counter()
        await server.stop(0.5)
        out["server_stop_s"] = round(time.perf_counter() - stop_started, 2)
        api.close()
        with suppress(Exception):
            await asyncio.to_thread(call, STOP)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.k8s_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--services", type=int, default=2000)
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--cluster-wide", action="store_true", help="one watch for every namespace")
    parser.add_argument("--writes", type=int, default=40, help="EndpointSlice writes timed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--no-live-memory",
        dest="live_memory",
        action="store_false",
        help="skip tracemalloc (it slows the subscriptions down several times)",
    )
    parser.add_argument("--log-level", default="ERROR", help="of this process (WARNING shows watch errors)")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=args.log_level.upper())
    out = asyncio.run(_run(args))
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
