"""ORCA + ``weighted_round_robin``: backends of different capacity report their load, the client spreads by
it (`python -m benchmarks.orca_wrr`).

Three Greet backends on 127.0.0.1 (gRPC servers in this process) with ORCA interceptors, of capacities
100, 200 and 400 calls/s (``--capacities``): each reports ``application_utilization`` = the QPS it measured
over the last second / its capacity, and that QPS (``lookaside_grpc.orca``'s measured rates). A client
(concurrency ``--concurrency``) calls them through a lookaside channel for ``--seconds`` after a warm-up,
once with ``round_robin`` and once with ``weighted_round_robin`` (blackout 2 s, weights refreshed every
0.5 s). Printed per backend: its share of the calls next to its share of the capacity, and the
utilization it reported at the end. gRFC A58's weight is ``qps / utilization`` = the capacity, so the shares
should follow the capacities and every backend run at the same utilization. Bounded: calls and time.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

import lookaside_grpc
from examples.greet import greet_pb2, greet_pb2_grpc
from examples.greet.server import GreetServicer
from lookaside_grpc import orca

#: Most calls one measurement makes (besides its time limit).
MAX_CALLS = 200_000


class CapacityGreet(GreetServicer):
    """Greet that reports its utilization as the QPS it serves over its nominal capacity."""

    def __init__(self, name: str, capacity: float, recorder: orca.ServerMetricRecorder) -> None:
        super().__init__(name)
        self.capacity = capacity
        self.recorder = recorder

    def Greet(self, request: greet_pb2.GreetingRequest, context: grpc.ServicerContext) -> Any:
        qps, _ = self.recorder.measured_rates()
        orca.call_recorder().record_application_utilization(qps / self.capacity)
        return super().Greet(request, context)


@contextmanager
def backends(capacities: list[float]) -> Iterator[list[tuple[str, orca.ServerMetricRecorder, float]]]:
    """Greet servers with ORCA interceptors: (address, recorder, capacity) each."""
    servers: list[grpc.Server] = []
    out: list[tuple[str, orca.ServerMetricRecorder, float]] = []
    try:
        for capacity in capacities:
            recorder = orca.ServerMetricRecorder()
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=8), interceptors=[orca.OrcaServerInterceptor(recorder)]
            )
            port = server.add_insecure_port("127.0.0.1:0")
            address = f"127.0.0.1:{port}"
            greet_pb2_grpc.add_GreetServiceServicer_to_server(
                CapacityGreet(address, capacity, recorder), server
            )
            server.start()
            servers.append(server)
            out.append((address, recorder, capacity))
        yield out
    finally:
        for s in servers:
            s.stop(grace=None).wait(5)


def measure(
    lookaside: str,
    bs: list[tuple[str, orca.ServerMetricRecorder, float]],
    policy: str,
    warmup: float,
    seconds: float,
    concurrency: int,
) -> dict[str, Any]:
    """Calls for ``warmup`` + ``seconds`` seconds; the spread over the last ``seconds``."""
    chosen: str | lookaside_grpc.RoutingPolicy = policy
    if policy == "weighted_round_robin":
        chosen = lookaside_grpc.WeightedRoundRobin(blackout_period=2.0, weight_update_period=0.5)
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    request = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="orca", last_name="wrr"))
    with lookaside_grpc.channel("greet", lookaside=lookaside, policy=chosen) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        t0 = time.monotonic()
        start, end = t0 + warmup, t0 + warmup + seconds
        made = [0]

        def work() -> None:
            while (now := time.monotonic()) < end:
                with lock:
                    if made[0] >= MAX_CALLS:
                        return
                    made[0] += 1
                x = stub.Greet(request, timeout=5).result.rpartition(" from ")[2]
                if now >= start:
                    with lock:
                        counts[x] += 1

        threads = [threading.Thread(target=work, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(warmup + seconds + 30)
    total = sum(counts.values()) or 1
    capacity = sum(c for _, _, c in bs)
    rows = []
    for address, recorder, cap in bs:
        qps, _ = recorder.measured_rates()
        rows.append(
            {
                "backend": address,
                "capacity": cap,
                "capacity_share": round(cap / capacity, 4),
                "call_share": round(counts[address] / total, 4),
                "reported_utilization": round(qps / cap, 3),
            }
        )
    return {"policy": policy, "calls": total, "backends": rows}


def run(capacities: list[float], warmup: float, seconds: float, concurrency: int) -> list[dict[str, Any]]:
    from lookaside_dev.fakes import RunningLookaside

    with backends(capacities) as bs, RunningLookaside([a for a, _, _ in bs]) as la:
        return [
            measure(la.address, bs, policy, warmup, seconds, concurrency)
            for policy in ("round_robin", "weighted_round_robin")
        ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacities", default="100,200,400", help="calls/s each backend reports as 100 %%")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds before counting (blackout 2 s)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out")
    args = p.parse_args(argv)
    results = run([float(c) for c in args.capacities.split(",")], args.warmup, args.seconds, args.concurrency)
    for res in results:
        print(f"{res['policy']} ({res['calls']} calls):", flush=True)
        for row in res["backends"]:
            print(
                f"  capacity {row['capacity']:>6.0f} ({row['capacity_share'] * 100:4.1f} %)"
                f"  calls {row['call_share'] * 100:5.1f} %"
                f"  reported utilization {row['reported_utilization']:.2f}",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
