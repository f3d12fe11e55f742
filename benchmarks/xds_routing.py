"""xDS routing for stock ``xds:///`` clients (`python -m benchmarks.xds_routing`): the zone figure and
ring-hash stickiness, each against a baseline in the same run.

Zones: 8 Greet backends (4 in zone a, 4 in zone b, in this process) behind a lookaside (this process, static
file with zones), three stock xDS clients (processes of their own: the bootstrap, with the zone, is per
process) in zone a, zone b and no zone (the baseline: zone-unaware). Healthy, then zone a down to 2 pods.
Ring hash: 4 backends, two lookasides (``--xds-hash-header x-user-id`` and none, the baseline), one client
each making ``--per-key`` calls per key on two channels. Every phase is bounded in calls and time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from lookaside_dev.backends import Backend
from lookaside_dev.static_files import write_addresses, write_static
from lookaside_dev.xds_client import Driver
from lookaside_server import (
    ListenConfig,
    RunningServer,
    ServerConfig,
    StaticFileConfig,
    XdsConfig,
    run_in_thread,
)
from lookaside_server._xds.resources import XdsOptions

NAME = "greet.default"
HEADER = "x-user-id"


def _server(path: pathlib.Path, options: XdsOptions | None = None) -> RunningServer:
    return run_in_thread(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5),
            source=StaticFileConfig(path, poll_interval=0.02),
            xds=XdsConfig(options=options),
        )
    )


def _write_zones(path: pathlib.Path, zone_of: dict[str, str]) -> None:
    write_static(
        path,
        {
            "default/greet": [
                {"ip": a.rsplit(":", 1)[0], "port": int(a.rsplit(":", 1)[1]), "zone": z}
                for a, z in zone_of.items()
            ]
        },
    )


def _settled(
    d: Driver, calls: int, ok: Callable[[Counter[str]], bool], deadline: float = 30.0
) -> Counter[str]:
    """Batches of ``calls`` until one satisfies ``ok`` (the new endpoints reached the client) or the
    deadline; the last batch."""
    end = time.monotonic() + deadline
    while True:
        counts, failures, errors = d.call(calls)
        if failures:
            raise RuntimeError(f"{failures} calls failed: {errors}")
        if ok(counts) or time.monotonic() > end:
            return counts


def zones(calls: int) -> dict[str, Any]:
    backends = [Backend() for _ in range(8)]
    zone_of = {b.address: ("a" if i < 4 else "b") for i, b in enumerate(backends)}
    drivers: list[Driver] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "endpoints.json"
        _write_zones(path, zone_of)
        srv = _server(path)
        try:
            client_a, client_b, plain = (
                Driver(f"xds:///{NAME}", srv.address, zone=z) for z in ("a", "b", "")
            )
            drivers += [client_a, client_b, plain]

            def in_a(c: Counter[str]) -> float:
                return sum(n for a, n in c.items() if zone_of[a] == "a") / max(1, sum(c.values()))

            healthy_a = _settled(client_a, calls, lambda c: len(c) == 4)
            healthy_plain = _settled(plain, calls, lambda c: len(c) == 8)
            gone = {b.address for b in backends[2:4]}
            _write_zones(path, {a: z for a, z in zone_of.items() if a not in gone})
            half_a = _settled(client_a, calls, lambda c: not set(c) & gone and in_a(c) < 1.0)
            half_b = _settled(client_b, calls, lambda c: not set(c) & gone)
            per_pod = half_a + half_b
            even = 2 * calls / 6
            zone_a_pods = [b.address for b in backends[:2]]
            return {
                "calls_per_phase": calls,
                "healthy_zone_a_share": round(in_a(healthy_a), 4),
                "healthy_baseline_zone_a_share": round(in_a(healthy_plain), 4),
                "half_zone_a_kept": round(in_a(half_a), 4),
                "half_zone_b_kept_local": round(1 - in_a(half_b), 4),
                "half_per_pod": {f"{zone_of[a]} {a}": per_pod[a] for a in sorted(per_pod, key=zone_of.get)},
                "half_max_zone_a_pod_vs_even": round(max(per_pod[a] for a in zone_a_pods) / even, 3),
                "half_without_spill_zone_a_pod_vs_even": 1.5,
            }
        finally:
            for d in drivers:
                d.close()
            srv.stop()
            for b in backends:
                b.stop()


def ring_hash(keys: int, per_key: int) -> dict[str, Any]:
    backends = [Backend() for _ in range(4)]
    out: dict[str, Any] = {"keys": keys, "calls_per_key_per_channel": per_key}
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "endpoints.json"
        write_addresses(path, {"default/greet": [b.address for b in backends]})
        try:
            for label, options in (("ring_hash", XdsOptions(hash_headers={"*": HEADER})), ("baseline", None)):
                srv = _server(path, options)
                d = Driver(f"xds:///{NAME}", srv.address)
                try:
                    names = [f"user-{i}" for i in range(keys)]
                    runs = [
                        d.command(keys=names, header=HEADER, per_key=per_key, channel=ch, timeout=300)
                        for ch in (0, 1)
                    ]
                    if any(r["failures"] for r in runs):
                        raise RuntimeError(f"calls failed: {[r['errors'] for r in runs]}")
                    sticky = sum(
                        1
                        for k in names
                        if len(runs[0]["by_key"][k]) == 1 and runs[0]["by_key"][k] == runs[1]["by_key"][k]
                    )
                    owners = Counter(
                        next(iter(runs[0]["by_key"][k])) for k in names if len(runs[0]["by_key"][k]) == 1
                    )
                    out[label] = {
                        "sticky_keys_share": round(sticky / keys, 4),
                        "keys_per_backend": sorted(owners.values()),
                    }
                finally:
                    d.close()
                    srv.stop()
        finally:
            for b in backends:
                b.stop()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=1200, help="calls per client and phase (zones)")
    p.add_argument("--keys", type=int, default=100, help="header values (ring hash)")
    p.add_argument("--per-key", type=int, default=4, help="calls per value and channel (ring hash)")
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    z = zones(args.calls)
    print(
        f"zones, healthy: zone-a client {z['healthy_zone_a_share']:.1%} of calls in zone a "
        f"(zoneless baseline {z['healthy_baseline_zone_a_share']:.1%})",
        flush=True,
    )
    print(
        f"zones, zone a at 2 of 4 pods: zone-a client kept {z['half_zone_a_kept']:.1%} local (2/3 expected), "
        f"zone-b client {z['half_zone_b_kept_local']:.1%}; busiest zone-a pod "
        f"{z['half_max_zone_a_pod_vs_even']:.2f}x an even share "
        f"(without spill-over: {z['half_without_spill_zone_a_pod_vs_even']:.2f}x)",
        flush=True,
    )
    print(f"zones, calls per pod (both zone clients): {z['half_per_pod']}", flush=True)
    r = ring_hash(args.keys, args.per_key)
    for label in ("ring_hash", "baseline"):
        print(
            f"{label}: {r[label]['sticky_keys_share']:.1%} of {args.keys} header values on one backend "
            f"on both channels; values per backend {r[label]['keys_per_backend']}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"zones": z, "ring_hash": r}, f, indent=1)


if __name__ == "__main__":
    main()
