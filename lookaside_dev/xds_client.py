"""A stock gRPC xDS client driven over stdin, for the xDS end-to-end tests and benchmarks (a process of its
own: the xDS bootstrap, with the client's zone, is read once per process).

Usage: GRPC_XDS_BOOTSTRAP_CONFIG='{...}' python lookaside_dev/xds_client.py xds:///greet.default
Reads JSON lines on stdin, answers each with one JSON line on stdout:

* ``{"call": N}`` -> N sequential Greet calls:
  ``{"counts": {backend: calls}, "failures": F, "errors": [...]}``
* ``{"until": "host:port", "max": N}`` -> call until one lands on that backend (at most N calls):
  ``{"hit_at": unix time of that call's answer or null, "calls": calls made, "counts": ..., "failures": F}``
* ``{"keys": [k, ...], "header": "x-user-id", "per_key": N}`` -> N calls per key with the header set to it:
  ``{"by_key": {key: {backend: calls}}, "counts": ..., "failures": F}``

Every command may name ``"channel": i`` (default 0): the i-th channel to the same target, opened on first use
(channels share grpc's xDS client but each has its own load-balancing state); ``"call"`` and ``"until"``
take ``"metadata": [[key, value], ...]``.

Only ``grpc`` and the generated Greet stubs are used: no lookaside_grpc code in the call path.
:class:`Driver` starts and drives one such process (tests, ``benchmarks.xds_routing``).
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import grpc

from examples.greet import greet_pb2, greet_pb2_grpc

REPO = pathlib.Path(__file__).resolve().parents[1]

HELLO = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="Ada", last_name="Lovelace"))
#: Most channels one driver opens (commands are bounded like everything a test drives).
MAX_CHANNELS = 8


def bootstrap(address: str, node: str = "test-client", zone: str = "") -> str:
    """An xDS bootstrap (JSON) naming the lookaside at ``address``, with the client's ``zone`` if any."""
    node_info: dict[str, Any] = {"id": node, "cluster": "tests"}
    if zone:
        node_info["locality"] = {"zone": zone}
    servers = [
        {"server_uri": address, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}
    ]
    return json.dumps({"xds_servers": servers, "node": node_info})


class Driver:
    """This script in a process of its own, bootstrapped to ``lookaside`` in ``zone``: one JSON command
    in, one JSON line out (:meth:`command` fails after ``timeout`` seconds without an answer)."""

    def __init__(self, target: str, lookaside: str, zone: str = "", node: str = "test-client") -> None:
        env = dict(
            os.environ, GRPC_XDS_BOOTSTRAP_CONFIG=bootstrap(lookaside, node, zone), PYTHONPATH=str(REPO)
        )
        env.pop("GRPC_XDS_BOOTSTRAP", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(pathlib.Path(__file__).resolve()), target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def command(self, timeout: float = 60.0, **command: object) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        try:
            out: dict[str, Any] = json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            raise TimeoutError(f"xDS client did not answer {command} within {timeout} s") from None
        return out

    def call(self, n: int, **extra: object) -> tuple[Counter[str], int, list[str]]:
        """``n`` calls: (calls per backend, failures, first errors)."""
        out = self.command(call=n, **extra)
        return Counter(out["counts"]), out["failures"], out["errors"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def backend_of(result: str) -> str:
    return result.rsplit(" from ", 1)[-1]


def main() -> None:
    target = sys.argv[1]
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    channels: list[grpc.Channel] = []
    stubs: list[greet_pb2_grpc.GreetServiceStub] = []

    def stub_for(index: int) -> greet_pb2_grpc.GreetServiceStub:
        if not 0 <= index < MAX_CHANNELS:
            raise ValueError(f"channel {index} out of range")
        while len(stubs) <= index:
            channels.append(grpc.insecure_channel(target))
            stubs.append(greet_pb2_grpc.GreetServiceStub(channels[-1]))
        return stubs[index]

    def call(
        stub: greet_pb2_grpc.GreetServiceStub,
        counts: Counter[str],
        errors: list[str],
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> str | None:
        try:
            reply = stub.Greet(HELLO, timeout=timeout, wait_for_ready=True, metadata=metadata or None)
        except grpc.RpcError as e:
            errors.append(f"{e.code().name}: {e.details()}")
            return None
        backend = backend_of(reply.result)
        counts[backend] += 1
        return backend

    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            command = json.loads(line)
            counts: Counter[str] = Counter()
            errors: list[str] = []
            stub = stub_for(int(command.get("channel", 0)))
            metadata = tuple((str(k), str(v)) for k, v in command.get("metadata", ()))
            if "call" in command:
                for _ in range(int(command["call"])):
                    call(stub, counts, errors, metadata)
                out: dict[str, object] = {}
            elif "until" in command:
                want, hit_at, calls = command["until"], None, 0
                for calls in range(1, int(command.get("max", 100000)) + 1):  # noqa: B007
                    if call(stub, counts, errors, metadata) == want:
                        hit_at = time.time()
                        break
                out = {"hit_at": hit_at, "calls": calls}
            elif "keys" in command:
                header = str(command["header"])
                by_key: dict[str, Counter[str]] = {}
                for key in command["keys"]:
                    per: Counter[str] = Counter()
                    for _ in range(int(command.get("per_key", 1))):
                        if (backend := call(stub, counts, errors, ((header, str(key)),))) is not None:
                            per[backend] += 1
                    by_key[str(key)] = per
                out = {"by_key": {k: dict(v) for k, v in by_key.items()}}
            else:
                out = {"error": f"unknown command {command!r}"}
            out.update(counts=dict(counts), failures=len(errors), errors=errors[:5])
            print(json.dumps(out), flush=True)
    finally:
        for channel in channels:
            channel.close()


if __name__ == "__main__":
    main()
