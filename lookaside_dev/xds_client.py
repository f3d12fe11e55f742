"""A stock gRPC xDS client driven over stdin, for tests/test_xds_e2e.py (a process of its own: the xDS
bootstrap is read once per process).

Usage: GRPC_XDS_BOOTSTRAP_CONFIG='{...}' python lookaside_dev/xds_client.py xds:///greet.default
Reads JSON lines on stdin, answers each with one JSON line on stdout:

* ``{"call": N}`` -> N sequential Greet calls:
  ``{"counts": {backend: calls}, "failures": F, "errors": [...]}``
* ``{"until": "host:port", "max": N}`` -> call until one lands on that backend (at most N calls):
  ``{"hit_at": unix time of that call's answer or null, "calls": calls made, "counts": ..., "failures": F}``

Only ``grpc`` and the generated Greet stubs are used: no lookaside_grpc code in the call path.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import grpc

from examples.greet import greet_pb2, greet_pb2_grpc

HELLO = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="Ada", last_name="Lovelace"))


def backend_of(result: str) -> str:
    return result.rsplit(" from ", 1)[-1]


def main() -> None:
    target = sys.argv[1]
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    with grpc.insecure_channel(target) as channel:
        stub = greet_pb2_grpc.GreetServiceStub(channel)

        def call(counts: Counter[str], errors: list[str]) -> str | None:
            try:
                reply = stub.Greet(HELLO, timeout=timeout, wait_for_ready=True)
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")
                return None
            backend = backend_of(reply.result)
            counts[backend] += 1
            return backend

        for line in sys.stdin:
            if not line.strip():
                continue
            command = json.loads(line)
            counts: Counter[str] = Counter()
            errors: list[str] = []
            if "call" in command:
                for _ in range(int(command["call"])):
                    call(counts, errors)
                out: dict[str, object] = {}
            elif "until" in command:
                want, hit_at, calls = command["until"], None, 0
                for calls in range(1, int(command.get("max", 100000)) + 1):  # noqa: B007
                    if call(counts, errors) == want:
                        hit_at = time.time()
                        break
                out = {"hit_at": hit_at, "calls": calls}
            else:
                out = {"error": f"unknown command {command!r}"}
            out.update(counts=dict(counts), failures=len(errors), errors=errors[:5])
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
