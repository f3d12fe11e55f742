"""One client measurement in its own process: ``python -m benchmarks._client CONFIG.json``.

Protocol on stdin/stdout (one JSON line each way), so that the harness can sample server CPU exactly
around the measured phase:
  harness -> "start"   client dials and warms up, then prints {"ready": ...}
  harness -> "go"      client runs the workload, prints {"done": ...}, writes the result file, exits.
Client CPU is ``time.process_time()`` (all threads of this process) over the measured phase only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

import grpc

from benchmarks._modes import MODES, Ctx
from examples.greet import greet_pb2

CALL_TIMEOUT = 5.0


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _expect(word: str, timeout: float = 120.0) -> None:
    line = sys.stdin.readline()
    if line.strip() != word:
        raise SystemExit(f"expected {word!r} on stdin, got {line!r}")


def _backend(result: str) -> str:
    return result.rpartition(" from ")[2]


class Recorder:
    """Per-thread (or per-task) call records, merged at the end."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.start: list[float] = []
        self.backend: list[str] = []
        self.fails: list[tuple[float, str]] = []

    def ok(self, started: float, ended: float, result: str) -> None:
        """A call started at ``started`` answered ``result`` (the Greet answer, signed by its backend)."""
        self.lat.append(ended - started)
        self.start.append(started)
        self.backend.append(result)

    def failed(self, started: float, err: grpc.RpcError) -> None:
        """A call started at ``started`` failed with ``err``."""
        self.fails.append((started, err.code().name if hasattr(err, "code") else "UNKNOWN"))


def _measured(recs: list[Recorder], t0: float, cpu0: float, keep_ts: bool) -> dict[str, Any]:
    """End the measured phase: stop the clocks, name the backends, tell the harness, summarise."""
    t1, cpu1 = time.monotonic(), time.process_time()
    for r in recs:
        r.backend = [_backend(x) for x in r.backend]
    _say({"done": True})
    return _summarise(recs, t0, t1, cpu1 - cpu0, keep_ts)


def _summarise(recs: list[Recorder], t0: float, t1: float, cpu: float, keep_ts: bool) -> dict[str, Any]:
    lat = [x for r in recs for x in r.lat]
    counts: Counter[str] = Counter(b for r in recs for b in r.backend)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    if keep_ts:
        for r in recs:
            for ts, b in zip(r.start, r.backend, strict=True):
                if b not in first or ts < first[b]:
                    first[b] = ts
                if b not in last or ts > last[b]:
                    last[b] = ts
    fails = [f for r in recs for f in r.fails]
    return {
        "ok": len(lat),
        "failed": len(fails),
        "fail_codes": dict(Counter(c for _, c in fails)),
        "fail_ts": sorted(ts for ts, _ in fails)[:1000] if keep_ts else [],
        "t_go": t0,
        "duration_s": t1 - t0,
        "client_cpu_s": cpu,
        "latencies_ms": [round(x * 1000.0, 4) for x in lat],
        "per_backend": dict(counts),
        "first_ts": first,
        "last_ts": last,
    }


def _warmup_sync(caller: Any, n: int, budget_s: float) -> int:
    """Up to ``n`` successful calls, retrying failures until ``budget_s`` has passed; returns ok count."""
    ok, deadline = 0, time.monotonic() + budget_s
    req = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="warm", last_name="up"))
    while ok < n and time.monotonic() < deadline:
        try:
            caller.greet(req, CALL_TIMEOUT)
            ok += 1
        except grpc.RpcError:
            time.sleep(0.02)
    return ok


def _profiled(fn: Any, cfg: dict[str, Any], i: int) -> Any:
    """With BENCH_PROFILE_DIR set, profile a worker thread too (cProfile covers only its own thread)."""
    prof_dir = os.environ.get("BENCH_PROFILE_DIR")
    if not prof_dir:
        return fn

    def wrapped(*a: Any) -> None:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            fn(*a)
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(prof_dir, f"{cfg['mode']}-{cfg['scenario']}-t{i}.prof"))

    return wrapped


def run_sync(cfg: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
    mode = MODES[cfg["mode"]]
    _expect("start")
    t_dial = time.monotonic()
    caller = mode.make(ctx)
    dial_s = time.monotonic() - t_dial
    warm = _warmup_sync(caller, cfg.get("warmup", 20), 10.0)
    _say({"ready": True, "dial_s": dial_s, "warmup_ok": warm})
    _expect("go")

    n_calls, limit, conc = cfg["calls"], cfg["time_limit"], cfg["concurrency"]
    budget = itertools.count()
    recs = [Recorder() for _ in range(conc)]
    cpu0, t0 = time.process_time(), time.monotonic()
    deadline = t0 + limit

    def worker(i: int) -> None:
        r = recs[i]
        req = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="bench", last_name=str(i)))
        mono, greet = time.monotonic, caller.greet
        while next(budget) < n_calls:
            ts = mono()
            if ts >= deadline:
                break
            try:
                resp = greet(req, CALL_TIMEOUT)
            except grpc.RpcError as e:
                r.failed(ts, e)
                continue
            r.ok(ts, mono(), resp.result)

    threads = [
        threading.Thread(target=_profiled(worker, cfg, i), args=(i,), daemon=True) for i in range(conc)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=limit + CALL_TIMEOUT + 30.0)
    out = _measured(recs, t0, cpu0, cfg.get("keep_ts", False))
    out.update(dial_s=dial_s, warmup_ok=warm, info=caller.info())
    t_close = time.monotonic()
    caller.close()
    out["close_s"] = time.monotonic() - t_close
    return out


async def _run_aio(
    cfg: dict[str, Any], ctx: Ctx, loop_ready: threading.Event | None = None
) -> dict[str, Any]:
    mode = MODES[cfg["mode"]]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _expect, "start")
    t_dial = time.monotonic()
    caller = await mode.make(ctx)
    dial_s = time.monotonic() - t_dial
    warm, deadline_w = 0, time.monotonic() + 10.0
    req = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="warm", last_name="up"))
    while warm < cfg.get("warmup", 20) and time.monotonic() < deadline_w:
        try:
            await caller.greet(req, CALL_TIMEOUT)
            warm += 1
        except grpc.RpcError:
            await asyncio.sleep(0.02)
    _say({"ready": True, "dial_s": dial_s, "warmup_ok": warm})
    await loop.run_in_executor(None, _expect, "go")

    n_calls, limit, conc = cfg["calls"], cfg["time_limit"], cfg["concurrency"]
    budget = itertools.count()
    recs = [Recorder() for _ in range(conc)]
    cpu0, t0 = time.process_time(), time.monotonic()
    deadline = t0 + limit

    async def worker(i: int) -> None:
        r = recs[i]
        req = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="bench", last_name=str(i)))
        mono, greet = time.monotonic, caller.greet
        while next(budget) < n_calls:
            ts = mono()
            if ts >= deadline:
                break
            try:
                resp = await greet(req, CALL_TIMEOUT)
            except grpc.RpcError as e:
                r.failed(ts, e)
                continue
            r.ok(ts, mono(), resp.result)

    await asyncio.wait_for(
        asyncio.gather(*(worker(i) for i in range(conc))), timeout=limit + CALL_TIMEOUT + 30.0
    )
    out = _measured(recs, t0, cpu0, cfg.get("keep_ts", False))
    out.update(dial_s=dial_s, warmup_ok=warm, info=caller.info())
    t_close = time.monotonic()
    await caller.close()
    out["close_s"] = time.monotonic() - t_close
    return out


def run_small(cfg: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
    """Many short-lived clients: each a new channel (dial, ``calls_per_client`` calls, close)."""
    mode = MODES[cfg["mode"]]
    _expect("start")
    _say({"ready": True})
    _expect("go")
    n_clients, per, par = cfg["clients"], cfg["calls_per_client"], cfg["parallel"]
    deadline = time.monotonic() + cfg["time_limit"]
    nxt = itertools.count()
    recs = [Recorder() for _ in range(par)]
    dials: list[float] = []
    closes: list[float] = []
    client_first: Counter[str] = Counter()
    lock = threading.Lock()
    cpu0, t0 = time.process_time(), time.monotonic()

    def worker(i: int) -> None:
        r = recs[i]
        req = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="small", last_name=str(i)))
        while next(nxt) < n_clients and time.monotonic() < deadline:
            td = time.monotonic()
            try:
                caller = mode.make(ctx)
            except Exception as e:  # noqa: BLE001 - a failed dial counts as failed calls
                r.fails.extend((td, type(e).__name__) for _ in range(per))
                continue
            tc = time.monotonic()
            first = None
            for _ in range(per):
                ts = time.monotonic()
                try:
                    resp = caller.greet(req, CALL_TIMEOUT)
                except grpc.RpcError as e:
                    r.failed(ts, e)
                    continue
                b = _backend(resp.result)
                r.ok(ts, time.monotonic(), b)
                first = first or b
            tx = time.monotonic()
            caller.close()
            te = time.monotonic()
            with lock:
                dials.append(tc - td)
                closes.append(te - tx)
                if first:
                    client_first[first] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(par)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=cfg["time_limit"] + 60.0)
    t1, cpu1 = time.monotonic(), time.process_time()
    _say({"done": True})
    out = _summarise(recs, t0, t1, cpu1 - cpu0, False)
    out.update(
        clients_done=len(dials),
        dial_s_mean=sum(dials) / len(dials) if dials else None,
        close_s_mean=sum(closes) / len(closes) if closes else None,
        close_s_max=max(closes) if closes else None,
        first_call_backend=dict(client_first),
    )
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        cfg = json.load(f)
    ctx = Ctx(**cfg["ctx"])
    prof_dir = os.environ.get("BENCH_PROFILE_DIR")  # profile the client: dumps MODE-SCENARIO.prof there
    if prof_dir:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            out = _dispatch(cfg, ctx)
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(prof_dir, f"{cfg['mode']}-{cfg['scenario']}.prof"))
    else:
        out = _dispatch(cfg, ctx)
    with open(cfg["result_path"], "w") as f:
        json.dump(out, f)


def _dispatch(cfg: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
    if cfg["scenario"] == "small":
        out = run_small(cfg, ctx)
    elif MODES[cfg["mode"]].kind == "aio":
        out = asyncio.run(_run_aio(cfg, ctx))
    else:
        out = run_sync(cfg, ctx)
    return out


if __name__ == "__main__":
    main()
