"""Slow start: a third pod joins two; its share of the calls each second (`python -m benchmarks.slow_start`).

Backends in a child process (benchmarks/slow_backend.py's, none slow), a lookaside in this process, the
client (concurrency 4) here. A full share is 1/3; with slow start it ramps over ``--window`` seconds.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from typing import Any

import lookaside_grpc
from benchmarks.slow_backend import backends
from examples.greet import greet_pb2, greet_pb2_grpc


def run(window: float | None, seconds: float, concurrency: int = 4) -> dict[str, Any]:
    from lookaside_dev.fakes import RunningLookaside

    with backends(0.0) as b, RunningLookaside(b.addresses[:2]) as la:
        new = b.addresses[2]
        with lookaside_grpc.channel("greet", lookaside=la.address, slow_start=window) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            request = greet_pb2.GreetingRequest(
                greeting=greet_pb2.Greeting(first_name="slow", last_name="start")
            )
            for _ in range(50):
                stub.Greet(request, timeout=5)
            la.servicer.set_endpoints(b.addresses)
            t0 = time.monotonic()
            per: dict[int, Counter[str]] = {}
            lock = threading.Lock()

            def work() -> None:
                while (now := time.monotonic()) < t0 + seconds:
                    x = stub.Greet(request, timeout=5).result.rpartition(" from ")[2]
                    with lock:
                        per.setdefault(int(now - t0), Counter())[x] += 1

            ts = [threading.Thread(target=work, daemon=True) for _ in range(concurrency)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(seconds + 30)
    return {
        "window_s": window,
        "share_per_second": {k: round(c[new] / sum(c.values()), 4) for k, c in sorted(per.items())},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--window", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=32.0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    res = run(args.window, args.seconds)
    print(" ".join(f"{s * 100:.0f}%" for s in res["share_per_second"].values()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
