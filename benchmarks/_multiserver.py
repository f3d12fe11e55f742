"""Several Greet backends in ONE process, one port each: ``python -m benchmarks._multiserver --ports P1,P2``.

Prints ``{"listening": ["127.0.0.1:P1", ...]}`` on start and, on SIGTERM/SIGINT, one stats JSON line per
backend (``{"name", "calls", "connections"}``), the same lines a single Greet backend prints.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading

from examples.greet.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ports", required=True, help="comma-separated ports (0 = any free port)")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    servers = [serve(int(p), args.host, args.delay) for p in args.ports.split(",") if p.strip()]
    print(json.dumps({"listening": [f"{args.host}:{port}" for _, _, port in servers]}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    events = [server.stop(grace=2) for server, _, _ in servers]
    for e in events:
        e.wait(5)
    for _, servicer, _ in servers:
        print(json.dumps(servicer.stats()), flush=True)


if __name__ == "__main__":
    main()
