"""One slow backend, and one that becomes fast again: ``python -m benchmarks.slow_backend``.

Three Greet backends in a child process (one adds ``--delay`` seconds per call; the child switches it
off or on when told on stdin), a lookaside in this process, and the clients in this process. Each round
measures the policies two ways: in a closed loop, one policy after the other (order rotating), 16 threads
calling back to back (calls/s, this process's CPU per call); and *together*: every policy at the same time
on its own channel and 16 threads, each an open loop offered the same calls/s (together, by default half
of round_robin's closed-loop calls/s that round). Both: p99, its ratio to round_robin's in the same round
and the share of calls the slow backend received. Then, per least-loaded policy, the slow backend turns
fast under load and its share is shown per 0.5 s window. The summary gives each figure's median (min-max)
over the rounds, and the machine's load average.

Why together: in a closed loop a policy that stops waiting on the slow backend turns that into calls/s
(1.2-1.7x round_robin's here), and with the cores busy the fast backends' queues grow back to 16 calls in
flight, so the p99 it wins is bounded by queueing, not routing; and one policy after the other, a stall of
this shared machine (100 ms and more under load) lands in one policy's run and sets its p99. Together, at
equal offered load, the same stalls hit every policy and only the routing differs. The tests
(tests/test_routing_slow.py) use the same pieces.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import lookaside_grpc
from examples.greet import greet_pb2, greet_pb2_grpc

CONCURRENCY = 16
SLOW_DELAY = 0.02
POLICIES = ("round_robin", "least_request", "peak_ewma")
Call = tuple[float, float, str]  # (start, latency, backend)


def _serve(delay: float) -> None:
    """Child: two fast backends and a slow one; stdin ``fast``/``slow`` switches the slow one's delay."""
    from examples.greet.server import serve

    servers = [serve(0, "127.0.0.1") for _ in range(2)] + [serve(0, "127.0.0.1", delay=delay)]
    print(json.dumps({"listening": [f"127.0.0.1:{port}" for _, _, port in servers]}), flush=True)
    slow = servers[-1][1]
    for line in sys.stdin:
        word = line.strip()
        if word == "fast":
            slow.delay = 0.0
        elif word == "slow":
            slow.delay = delay
        else:
            break
        print(json.dumps({"ok": word}), flush=True)
    for server, _, _ in servers:
        server.stop(grace=None).wait(5)


class Backends:
    """The child process: ``addresses`` (the last one slow), :meth:`switch` to ``fast``/``slow``."""

    def __init__(self, delay: float = SLOW_DELAY) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.slow_backend", "--serve", "--delay", str(delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("backend process died")
        self.addresses: list[str] = json.loads(line)["listening"]
        self.slow = self.addresses[-1]

    def switch(self, word: str) -> None:
        """Tell the child; returns once it has switched (it answers on stdout)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        assert json.loads(self.proc.stdout.readline()) == {"ok": word}

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextmanager
def backends(delay: float = SLOW_DELAY) -> Iterator[Backends]:
    b = Backends(delay)
    try:
        yield b
    finally:
        b.close()


def load(
    stub: Any,
    until: Callable[[list[Call]], bool],
    max_s: float,
    concurrency: int = CONCURRENCY,
    rate: float = 0.0,
) -> list[Call]:
    """``concurrency`` threads calling until ``until(calls so far)`` (called under a lock) or ``max_s``
    seconds (bounded); with ``rate`` (calls/s, all threads) each thread starts its calls on a fixed schedule
    (an open loop: every policy is offered the same load, so a faster policy does not load the machine more;
    a thread behind its schedule calls at once)."""
    out: list[Call] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    deadline = time.monotonic() + max_s
    request = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="slow", last_name="bench"))

    start = time.monotonic()

    def work(i: int) -> None:
        k = 0
        try:
            while time.monotonic() < deadline:
                with lock:
                    if until(out):
                        break
                if rate:
                    due = start + (k * concurrency + i) / rate
                    k += 1
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)  # pacing of the offered load, not synchronisation
                t0 = time.monotonic()
                result = stub.Greet(request, timeout=5).result
                t1 = time.monotonic()
                with lock:
                    out.append((t0, t1 - t0, result.rpartition(" from ")[2]))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(max_s + 10)
    if errors:
        raise errors[0]
    return out


def p99(calls: list[Call]) -> float:
    s = sorted(lat for _, lat, _ in calls)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def share(calls: list[Call], address: str) -> float:
    return sum(1 for _, _, b in calls if b == address) / len(calls)


def figures(policy: str, got: list[Call], b: Backends, elapsed: float) -> dict[str, Any]:
    """p50/p99 (ms), calls/s and the slow backend's share of ``got``."""
    lat = sorted(x[1] for x in got)
    return {
        "policy": policy,
        "calls": len(got),
        "calls_per_s": len(got) / elapsed,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": p99(got) * 1000,
        # the fast backends' own tail: on a loaded machine it, not the slow backend, sets the policies' p99
        "p99_fast_ms": p99([c for c in got if c[2] != b.slow]) * 1000,
        "to_slow": sum(1 for _, _, x in got if x == b.slow),
        "slow_share": share(got, b.slow),
    }


def measure(lookaside: str, b: Backends, policy: str, calls: int, rate: float = 0.0) -> dict[str, Any]:
    """One policy on a fresh channel: warm-up, then ``calls`` calls; p99 (ms) and the slow one's share."""
    with lookaside_grpc.channel("greet", lookaside=lookaside, policy=policy) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        load(stub, lambda got: len(got) >= 300, 30)
        t0, cpu0 = time.monotonic(), time.process_time()
        got = load(stub, lambda got: len(got) >= calls, 60, rate=rate)
        elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    out = figures(policy, got, b, elapsed)
    out["cpu_ms_per_call"] = cpu / len(got) * 1000  # this process's CPU (client, policy, idle lookaside)
    return out


def measure_together(
    lookaside: str, b: Backends, policies: tuple[str, ...], calls: int, rate: float
) -> dict[str, dict[str, Any]]:
    """Every policy at the same time, each on its own channel (warmed up first) with its own 16 threads in
    an open loop at ``rate`` calls/s: the same offered load at the same moments, so the stalls of a shared
    machine hit every policy alike and only the routing differs. The fast backends serve them all."""
    with ExitStack() as stack:
        stubs = {}
        for policy in policies:
            ch = stack.enter_context(lookaside_grpc.channel("greet", lookaside=lookaside, policy=policy))
            stubs[policy] = greet_pb2_grpc.GreetServiceStub(ch)
            load(stubs[policy], lambda got: len(got) >= 300, 30)
        got: dict[str, list[Call]] = {}
        errors: list[BaseException] = []

        def run(policy: str) -> None:
            try:
                got[policy] = load(stubs[policy], lambda got: len(got) >= calls, 60, rate=rate)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(p,), daemon=True) for p in policies]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        elapsed = time.monotonic() - t0
    if errors:
        raise errors[0]
    return {p: figures(p, got[p], b, elapsed) for p in policies}


def recovery(lookaside: str, b: Backends, policy: str, after_s: float = 6.0) -> dict[str, Any]:
    """The slow backend turns fast under load: its share per 0.5 s window after the switch."""
    with lookaside_grpc.channel("greet", lookaside=lookaside, policy=policy) as ch:
        stub = greet_pb2_grpc.GreetServiceStub(ch)
        load(stub, lambda got: len(got) >= 300, 30)  # warm-up: connections and first latencies
        before = load(stub, lambda got: len(got) >= 2000, 30)
        switched: list[float] = []

        def switch_then_stop(_: list[Call]) -> bool:
            return bool(switched) and time.monotonic() > switched[0] + after_s

        def switcher() -> None:
            b.switch("fast")
            switched.append(time.monotonic())

        t = threading.Thread(target=switcher, daemon=True)
        t.start()  # the switch happens while the load below runs
        after = load(stub, switch_then_stop, after_s + 15)
        t.join(10)
        b.switch("slow")
    t_switch = switched[0]
    windows: dict[int, Counter[str]] = {}
    for t0, _, x in after:
        if t0 >= t_switch:
            windows.setdefault(int((t0 - t_switch) / 0.5), Counter())[x] += 1
    shares = {
        k * 0.5: w[b.slow] / sum(w.values()) for k, w in sorted(windows.items()) if sum(w.values()) >= 20
    }
    full = 1 / len(b.addresses)
    regained = next((t for t, s in shares.items() if s >= 0.75 * full), None)
    return {
        "policy": policy,
        "share_before": share(before, b.slow),
        "shares_per_half_second": shares,
        "regained_after_s": regained,  # start of the first 0.5 s window with >= 3/4 of a full share
    }


def _spread(xs: list[float]) -> str:
    """median (min-max)"""
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--delay", type=float, default=SLOW_DELAY)
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="open-loop calls/s of all policies together; 0 = --load x round_robin's closed-loop calls/s",
    )
    p.add_argument("--load", type=float, default=0.5, help="see --rate")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.serve:
        _serve(args.delay)
        return
    from lookaside_dev.fakes import RunningLookaside

    results: dict[str, Any] = {
        "delay_s": args.delay,
        "concurrency": CONCURRENCY,
        "calls": args.calls,
        "rate": args.rate,
        "load": args.load,
        "rounds": [],
        "recovery": [],
        "uptime_before": _uptime(),
    }

    def show(r: int, kind: str, row: dict[str, dict[str, Any]]) -> None:
        rr = row["round_robin"]["p99_ms"]
        for v in row.values():
            v["p99_vs_round_robin"] = v["p99_ms"] / rr
        print(
            f"round {r} {kind}: "
            + ", ".join(
                f"{k} {v['calls_per_s']:.0f}/s p99 {v['p99_ms']:.1f} ms ({v['p99_vs_round_robin']:.2f}x; "
                f"fast only {v['p99_fast_ms']:.1f}) slow {v['slow_share'] * 100:.2f}%"
                + (f" cpu {v['cpu_ms_per_call']:.3f} ms" if "cpu_ms_per_call" in v else "")
                for k, v in row.items()
            ),
            flush=True,
        )

    with backends(args.delay) as b, RunningLookaside(b.addresses) as la:
        for r in range(args.rounds):
            k = r % len(POLICIES)
            order = POLICIES[k:] + POLICIES[:k]
            closed = {pol: measure(la.address, b, pol, args.calls) for pol in order}
            show(r, "closed loop", closed)
            rate = args.rate or args.load * closed["round_robin"]["calls_per_s"]
            each = rate / len(order)
            together = measure_together(la.address, b, order, args.calls, each)
            show(r, f"together, {each:.0f}/s each", together)
            results["rounds"].append({"closed": closed, "together": together, "rate": rate})
            for pol in order[::-1]:
                if pol == "round_robin":
                    continue
                rec = recovery(la.address, b, pol)
                rec["round"] = r
                results["recovery"].append(rec)
                print(
                    f"round {r} recovery {pol}: share before {rec['share_before'] * 100:.2f}%, "
                    f"regained after {rec['regained_after_s']} s; per 0.5 s: "
                    + " ".join(f"{s * 100:.0f}%" for s in rec["shares_per_half_second"].values()),
                    flush=True,
                )
    results["uptime_after"] = _uptime()
    summary: dict[str, Any] = {}
    for pol in POLICIES[1:]:
        row: dict[str, Any] = {}
        for kind in ("closed", "together"):
            ratios = [x[kind][pol]["p99_vs_round_robin"] for x in results["rounds"]]
            share = [x[kind][pol]["slow_share"] * 100 for x in results["rounds"]]
            if kind == "together":  # one process for all: no CPU per policy
                row[kind] = {"p99_vs_round_robin": ratios, "slow_share_pct": share}
                print(f"{pol} {kind}: p99 x round_robin {_spread(ratios)}, slow share % {_spread(share)}")
                continue
            cpu = [
                x[kind][pol]["cpu_ms_per_call"] / x[kind]["round_robin"]["cpu_ms_per_call"]
                for x in results["rounds"]
            ]
            row[kind] = {"p99_vs_round_robin": ratios, "cpu_vs_round_robin": cpu, "slow_share_pct": share}
            print(
                f"{pol} {kind} loop: p99 x round_robin {_spread(ratios)}, slow share % {_spread(share)}, "
                f"CPU/call x round_robin {_spread(cpu)}"
            )
        regained = [x["regained_after_s"] for x in results["recovery"] if x["policy"] == pol]
        row["regained_after_s"] = regained
        print(f"{pol} recovery: full share regained after (s, per round) {regained}")
        summary[pol] = row
    results["summary"] = summary
    print(f"load average: before {results['uptime_before']}; after {results['uptime_after']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def _uptime() -> str:
    """The machine's load averages (1, 5, 15 min), for the record."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
