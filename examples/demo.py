"""Local demo: a lookaside server, Greet backends and a client on 127.0.0.1, with the spread of calls printed.

Starts the lookaside server over a static endpoint file and three Greet backends (each its own process),
sends calls through ``lookaside_grpc.channel``, then adds a fourth backend to the file and shows traffic
reaching it without restarting anything. Every process it starts is stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter

import grpc

import lookaside_grpc
from examples.greet import greet_pb2, greet_pb2_grpc
from lookaside_dev.procs import Child, Children, greet_backend, lookaside_server

SERVICE, NAMESPACE = "greet", "default"
HELLO = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="Ada", last_name="Lovelace"))


def write_endpoints(path: str, addresses: list[str]) -> None:
    """Atomically replace the static endpoint file (JSON is valid YAML) with ``addresses``."""
    endpoints = [
        {"ip": a.rsplit(":", 1)[0], "port": int(a.rsplit(":", 1)[1]), "zone": "local"} for a in addresses
    ]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({f"{NAMESPACE}/{SERVICE}": endpoints}, f, indent=2)
    os.replace(tmp, path)


def call(stub: greet_pb2_grpc.GreetServiceStub, n: int, spread: Counter[str]) -> int:
    """Send ``n`` Greet calls, counting answers per backend; return the number that failed."""
    failed = 0
    for _ in range(n):
        try:
            reply = stub.Greet(HELLO, timeout=5)
        except grpc.RpcError as err:
            failed += 1
            logging.warning("call failed: %s %s", err.code().name, err.details())
        else:
            spread[reply.result.rsplit(" from ", 1)[-1]] += 1
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--version",
        action="version",
        version=f"python -m examples.demo (lookaside-grpc {lookaside_grpc.__version__})",
    )
    parser.add_argument("--calls", type=int, default=300, help="calls per phase")
    parser.add_argument("--backends", type=int, default=3)
    parser.add_argument("--mode", default="watch", choices=["watch", "per_call"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    before: Counter[str] = Counter()
    after: Counter[str] = Counter()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp, Children() as children:
        static = os.path.join(tmp, "endpoints.yaml")
        backends: dict[str, Child] = {}
        for _ in range(args.backends):
            child, address = greet_backend(children)
            backends[address] = child
        write_endpoints(static, list(backends))
        _, lookaside = lookaside_server(children, static)
        print(f"lookaside server on {lookaside}; backends: {', '.join(backends)}")

        with lookaside_grpc.channel(SERVICE, namespace=NAMESPACE, lookaside=lookaside, mode=args.mode) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            failed += call(stub, args.calls, before)
            print(f"phase 1: {args.calls} calls over {args.backends} backends ({args.mode} mode)")

            child, new = greet_backend(children)
            backends[new] = child
            write_endpoints(static, list(backends))
            changed = time.monotonic()
            print(f"added backend {new} to the endpoint file; nothing restarted")
            probe: Counter[str] = Counter()
            deadline = changed + 10
            while probe[new] == 0 and time.monotonic() < deadline:
                failed += call(stub, 1, probe)
            reached = time.monotonic() - changed if probe[new] else None
            after.update(probe)
            failed += call(stub, args.calls, after)

        connections: dict[str, int] = {}
        for address, child in backends.items():
            start = len(child.lines)
            child.stop()
            for line in child.lines[start:]:
                if line.startswith("{") and '"connections"' in line:
                    connections[address] = json.loads(line)["connections"]

    print()
    print(f"{'backend':<22}{'calls before':>14}{'calls after':>13}{'connections':>13}")
    for address in backends:
        print(f"{address:<22}{before[address]:>14}{after[address]:>13}{connections.get(address, '?'):>13}")
    print(f"{'total':<22}{sum(before.values()):>14}{sum(after.values()):>13}")
    if reached is None:
        print("the new backend was NOT reached within 10 s")
    else:
        print(f"new backend reached {reached * 1000:.0f} ms after the file changed; failed calls: {failed}")
    return 0 if reached is not None and failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
