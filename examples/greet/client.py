"""The Greet client of the original design, calling the backends through the lookaside channel factory.

Configured by flags or the environment (as the Kubernetes manifests do): ``LOOKASIDE_ADDR``,
``GREET_SERVICE``, ``GREET_NAMESPACE``, ``LOOKASIDE_MODE``.
Run: ``python -m examples.greet.client``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter

import grpc

import lookaside_grpc
from examples.greet import greet_pb2, greet_pb2_grpc

HELLO = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="Ada", last_name="Lovelace"))


def main(argv: list[str] | None = None) -> int:
    """Send ``--count`` Greet calls (0 = until interrupted) and print each answer, then the spread."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--version",
        action="version",
        version=f"python -m examples.greet.client (lookaside-grpc {lookaside_grpc.__version__})",
    )
    parser.add_argument("--lookaside", default=env("LOOKASIDE_ADDR", "127.0.0.1:50055"))
    parser.add_argument("--service", default=env("GREET_SERVICE", "greet"))
    parser.add_argument("--namespace", default=env("GREET_NAMESPACE", "default"))
    parser.add_argument("--mode", default=env("LOOKASIDE_MODE", "watch"), choices=["watch", "per_call"])
    parser.add_argument("--count", type=int, default=10, help="calls to send; 0 = forever")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between calls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    spread: Counter[str] = Counter()
    sent = 0
    with lookaside_grpc.channel(
        args.service, namespace=args.namespace, lookaside=args.lookaside, mode=args.mode
    ) as channel:
        stub = greet_pb2_grpc.GreetServiceStub(channel)
        try:
            while args.count == 0 or sent < args.count:
                sent += 1
                try:
                    reply = stub.Greet(HELLO, timeout=5)
                except grpc.RpcError as err:
                    print(f"call {sent}: {err.code().name}: {err.details()}", flush=True)
                else:
                    print(reply.result, flush=True)
                    spread[reply.result.rsplit(" from ", 1)[-1]] += 1
                if args.interval:
                    time.sleep(args.interval)
        except KeyboardInterrupt:
            pass
    for backend, calls in sorted(spread.items()):
        print(f"{backend}\t{calls}")
    return 0 if spread else 1


if __name__ == "__main__":
    sys.exit(main())
