"""Consistent hashing on a call metadata value: ``python -m benchmarks.ring_hash``.

Greet backends in a child process, a lookaside in this process, the clients here. Prints: key stickiness
(every key asked several times by a sync channel, once by an aio channel and once by a stock grpc channel
with grpc's own ``ring_hash``: the share of keys all of them sent to one backend); the share of the keys that
moved when one of the N backends left (and A42's expectation, (2N - 2) / N^2: the ring keeps about
``min_ring_size`` entries, so the backends left gain entries); the spread of the keys over the backends; and
the client CPU per call of ``ring_hash`` vs ``round_robin`` (same calls, same metadata, rounds interleaved),
with the cost of the pick alone (hash of the key + ring lookup) next to ``round_robin``'s.
Bounded: ``--keys`` keys, ``--calls`` calls per CPU round, ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from statistics import median
from typing import Any

import grpc

import lookaside_grpc
import lookaside_grpc.aio
from examples.greet import greet_pb2, greet_pb2_grpc

KEY = "x-user-id"
REQUEST = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="ring", last_name="hash"))


def _serve(n: int) -> None:
    """Child: ``n`` Greet backends on 127.0.0.1 until stdin closes."""
    from examples.greet.server import serve

    servers = [serve(0, "127.0.0.1") for _ in range(n)]
    print(json.dumps({"listening": [f"127.0.0.1:{port}" for _, _, port in servers]}), flush=True)
    sys.stdin.read()
    for server, _, _ in servers:
        server.stop(grace=None).wait(5)


@contextmanager
def backends(n: int) -> Iterator[list[str]]:
    """``n`` backends in a child process (so this process's CPU time is the client's only)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.ring_hash", "--serve", str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("backend process died")
        yield json.loads(line)["listening"]
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _backend(result: str) -> str:
    return result.rsplit(" from ", 1)[-1].split(" #")[0]


def owners(stub: Any, users: list[str]) -> dict[str, str]:
    return {u: _backend(stub.Greet(REQUEST, timeout=5, metadata=((KEY, u),)).result) for u in users}


async def aio_owners(lookaside: str, users: list[str]) -> dict[str, str]:
    async with lookaside_grpc.aio.channel(
        "greet", lookaside=lookaside, policy="ring_hash", hash_key=KEY
    ) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        out = {}
        for u in users:
            out[u] = _backend((await stub.Greet(REQUEST, timeout=5, metadata=((KEY, u),))).result)
        return out


def stock_owners(addresses: list[str], users: list[str]) -> dict[str, str]:
    """grpc's own ring_hash (A76 ``requestHashHeader``; its flag is read when grpc parses the config)."""
    os.environ["GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"] = "true"
    config = {"loadBalancingConfig": [{"ring_hash_experimental": {"requestHashHeader": KEY}}]}
    with grpc.insecure_channel(
        "ipv4:" + ",".join(addresses), options=[("grpc.service_config", json.dumps(config))]
    ) as ch:
        return owners(greet_pb2_grpc.GreetServiceStub(ch), users)


def cpu_per_call(lookaside: str, policy: str, users: list[str], calls: int) -> float:
    """Client CPU seconds per call over ``calls`` blocking calls, each with a key (warmed up first)."""
    opts: dict[str, Any] = (
        {"policy": policy, "hash_key": KEY} if policy == "ring_hash" else {"policy": policy}
    )
    with lookaside_grpc.channel("greet", lookaside=lookaside, **opts) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        mds = [((KEY, u),) for u in users]
        for md in mds[:200]:
            stub.Greet(REQUEST, timeout=5, metadata=md)
        cpu0 = time.process_time()
        for i in range(calls):
            stub.Greet(REQUEST, timeout=5, metadata=mds[i % len(mds)])
        return (time.process_time() - cpu0) / calls


def pick_cost(n: int, picks: int = 20000, repeats: int = 5) -> dict[str, float]:
    """Microseconds per pick (the best of ``repeats`` runs, as timeit: the machine is shared): round_robin's,
    ring_hash's with a remembered key and with a new key each time (XXH64 in Python); a ring build's ms."""
    from lookaside_grpc._endpoints import Endpoint
    from lookaside_grpc._policies import RoundRobin
    from lookaside_grpc._ring_hash import RingHash, request_hash

    eps = tuple(Endpoint(f"10.0.0.{i + 1}", 8080) for i in range(n))
    rr, rh = RoundRobin(), RingHash(KEY)
    hot = [((KEY, f"user-{i % 1000}"),) for i in range(picks)]
    rh.pick(eps)  # the ring is built once per set, not per call
    best: dict[str, float] = {}

    def keep(name: str, seconds: float, count: int, scale: float = 1e6) -> None:
        best[name] = min(best.get(name, float("inf")), seconds / count * scale)

    for r in range(repeats):
        cold = [((KEY, f"new-{r}-{i}"),) for i in range(picks)]
        t0 = time.perf_counter()
        for _md in hot:
            rr.pick(eps)
        keep("round_robin_us", time.perf_counter() - t0, picks)
        for name, mds in (("ring_hash_hot_key_us", hot), ("ring_hash_new_key_us", cold)):
            t0 = time.perf_counter()
            for md in mds:
                rh.pick_hashed(eps, request_hash(md, KEY))
            keep(name, time.perf_counter() - t0, picks)
        t0 = time.perf_counter()
        RingHash(KEY).ring(eps)
        keep("ring_build_ms", time.perf_counter() - t0, 1, 1e3)
    return best


def run(n: int, keys: int, calls: int, rounds: int) -> dict[str, Any]:
    from lookaside_dev.fakes import RunningLookaside

    users = [f"user-{i}" for i in range(keys)]
    res: dict[str, Any] = {"backends": n, "keys": keys}
    with backends(n) as addresses, RunningLookaside(addresses) as la:
        with lookaside_grpc.channel("greet", lookaside=la.address, policy="ring_hash", hash_key=KEY) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            first = owners(stub, users)
            again = [owners(stub, users) for _ in range(2)]
            from_aio = asyncio.run(aio_owners(la.address, users))
            from_stock = stock_owners(addresses, users)
            sticky = sum(all(o[u] == first[u] for o in (*again, from_aio, from_stock)) for u in users) / len(
                users
            )
            spread = Counter(first.values())
            gone = addresses[n // 2]
            la.servicer.set_endpoints([a for a in addresses if a != gone])
            deadline = time.monotonic() + 10
            while gone in ch._balancer.resolver.state.addresses():  # type: ignore[attr-defined]
                if time.monotonic() > deadline:
                    raise RuntimeError("the client never saw the backend leave")
                time.sleep(0.01)
            after = owners(stub, users)
        la.servicer.set_endpoints(addresses)
        res["stickiness"] = sticky
        res["stock_grpc_agrees"] = sum(from_stock[u] == first[u] for u in users) / len(users)
        res["moved_when_one_left"] = sum(after[u] != first[u] for u in users) / len(users)
        res["were_on_the_one_that_left"] = sum(first[u] == gone for u in users) / len(users)
        res["a42_expected_moved"] = (2 * n - 2) / n**2
        res["spread"] = sorted(spread.values())
        cpu: dict[str, list[float]] = {"round_robin": [], "ring_hash": []}
        for _ in range(rounds):  # interleaved: both policies see the same machine load
            for policy in cpu:
                cpu[policy].append(cpu_per_call(la.address, policy, users, calls))
        ratios = [h / r for h, r in zip(cpu["ring_hash"], cpu["round_robin"], strict=True)]
        res["cpu_us_per_call"] = {p: round(median(v) * 1e6, 1) for p, v in cpu.items()}
        res["cpu_ratio_ring_hash_vs_round_robin"] = {
            "median": round(median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        }
    res["pick"] = {k: round(v, 3) for k, v in pick_cost(n).items()}
    res["fixed_entries_moved"] = fixed_entries_moved(addresses, users)
    return res


def fixed_entries_moved(addresses: list[str], users: list[str], entries: int = 256) -> dict[str, float]:
    """The same departure on ``RingHash(entries_per_endpoint=entries)``'s ring (policy only, no calls):
    the fraction of keys moved and the fraction that were on the backend that left."""
    from lookaside_grpc._endpoints import Endpoint
    from lookaside_grpc._ring_hash import RingHash, request_hash

    policy = RingHash(KEY, entries_per_endpoint=entries)
    full = tuple(Endpoint(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in addresses)
    gone = full[len(full) // 2]
    rest = tuple(e for e in full if e != gone)
    hashes = [request_hash(((KEY, u),), KEY) for u in users]
    before = [policy.pick_hashed(full, h).address for h in hashes]
    after = [policy.pick_hashed(rest, h).address for h in hashes]
    return {
        "entries_per_endpoint": entries,
        "moved": sum(a != b for a, b in zip(before, after, strict=True)) / len(users),
        "were_on_the_one_that_left": sum(b == gone.address for b in before) / len(users),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--backends", type=int, default=4)
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--calls", type=int, default=3000, help="calls per CPU round and policy")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.serve:
        _serve(args.serve)
        return
    res = run(args.backends, args.keys, args.calls, args.rounds)
    n, k = res["backends"], res["keys"]
    print(f"stickiness ({k} keys; sync x3, aio, stock grpc ring_hash): {res['stickiness']:.3f}")
    print(f"stock grpc ring_hash agrees with the client on {res['stock_grpc_agrees']:.3f} of the keys")
    print(
        f"one of {n} backends left: {res['moved_when_one_left']:.3f} of the keys moved "
        f"({res['were_on_the_one_that_left']:.3f} were on it; A42 expects {res['a42_expected_moved']:.3f})"
    )
    fx = res["fixed_entries_moved"]
    print(
        f"  on RingHash(entries_per_endpoint={fx['entries_per_endpoint']}) (not stock grpc's ring): "
        f"{fx['moved']:.3f} moved ({fx['were_on_the_one_that_left']:.3f} were on it)"
    )
    print(f"spread of {k} keys over {n} backends: {res['spread']}")
    r = res["cpu_ratio_ring_hash_vs_round_robin"]
    print(
        f"client CPU per call: ring_hash {res['cpu_us_per_call']['ring_hash']} us, round_robin "
        f"{res['cpu_us_per_call']['round_robin']} us; ring_hash/round_robin {r['median']} "
        f"({r['min']}-{r['max']})"
    )
    pk = res["pick"]
    print(
        f"the pick alone: round_robin {pk['round_robin_us']} us, ring_hash {pk['ring_hash_hot_key_us']} us "
        f"(remembered key), {pk['ring_hash_new_key_us']} us (new key: XXH64 in Python); ring build "
        f"{pk['ring_build_ms']} ms per endpoint-set change"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
