"""From raw run records to summaries, results.json, results.md and PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._runner import POLL_INTERVAL

PCTS = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))
BASELINE = "round_robin"
AIO_BASELINE = "aio_round_robin"


def _pcts(lat: list[float]) -> dict[str, float | None]:
    if not lat:
        return {k: None for k, _ in PCTS}
    a = np.asarray(lat, dtype=float)
    # "inverted_cdf": every percentile is an actual recorded sample (no interpolation).
    return {k: float(np.percentile(a, q, method="inverted_cdf")) for k, q in PCTS}


def _spread(counts: dict[str, int], expected: list[str] | None = None) -> float | None:
    keys = expected if expected else list(counts)
    vals = [counts.get(k, 0) for k in keys]
    if not vals or max(vals) == 0:
        return None
    return max(vals) / min(vals) if min(vals) > 0 else math.inf


def _per_1k(num: float | None, calls: int) -> float | None:
    if num is None or calls <= 0 or (isinstance(num, float) and math.isnan(num)):
        return None
    return num / calls * 1000.0


def _sum_opt(vals: list[float | None]) -> float | None:
    vals2 = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals2) if len(vals2) == len(vals) and vals2 else None


def _base_thr(runs: list[dict[str, Any]], baseline: str) -> dict[int, float]:
    return {r["round"]: r["ok"] / r["duration_s"] for r in runs if r["mode"] == baseline and r["duration_s"]}


def _base_cpu(runs: list[dict[str, Any]], baseline: str) -> dict[int, float]:
    """Client CPU s per 1,000 calls of the baseline, per round."""
    return {
        r["round"]: r["client_cpu_s"] / r["ok"] * 1000.0
        for r in runs
        if r["mode"] == baseline and r["ok"] and r.get("client_cpu_s") is not None
    }


def _is_aio(mode: str) -> bool:
    from benchmarks._modes import MODES

    m = MODES.get(mode)
    return m.kind == "aio" if m is not None else mode.startswith("aio_")


def baseline_of(mode: str) -> str:
    """The mode a mode's ratios are taken against: grpc.aio modes to aio_round_robin, the rest round_robin."""
    return AIO_BASELINE if _is_aio(mode) else BASELINE


def stat(vals: list[float | None]) -> dict[str, Any] | None:
    """Median, min and max of the per-round values (None values are skipped; None when there are none)."""
    xs = [float(v) for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarise_load(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Steady-state style summary per mode; ratios are medians of per-round ratios to round_robin (and, for
    the grpc.aio modes' targets, to aio_round_robin)."""
    base_thr = _base_thr(runs, BASELINE)
    aio_thr = _base_thr(runs, AIO_BASELINE)
    base_cpu = {BASELINE: _base_cpu(runs, BASELINE), AIO_BASELINE: _base_cpu(runs, AIO_BASELINE)}
    out: dict[str, Any] = {}
    for m in modes:
        rs = [r for r in runs if r["mode"] == m]
        if not rs:
            continue
        thr = [r["ok"] / r["duration_s"] if r["duration_s"] else 0.0 for r in rs]
        ratios = [t / base_thr[r["round"]] for t, r in zip(thr, rs, strict=True) if base_thr.get(r["round"])]
        aio_ratios = [
            t / aio_thr[r["round"]] for t, r in zip(thr, rs, strict=True) if aio_thr.get(r["round"])
        ]
        ok = sum(r["ok"] for r in rs)
        per_backend: dict[str, int] = {}
        for r in rs:
            for b, c in r["per_backend"].items():
                per_backend[b] = per_backend.get(b, 0) + c
        run_spreads = [
            _spread(r["per_backend"], sorted(set(r.get("backend_stats", {})) | set(r["per_backend"])))
            for r in rs
        ]
        run_spreads = [x for x in run_spreads if x is not None]
        lat = [x for r in rs for x in r["latencies_ms"]]
        base = baseline_of(m)
        own_thr = base_thr if base == BASELINE else aio_thr
        cpu = [r["client_cpu_s"] / r["ok"] * 1000.0 if r["ok"] else None for r in rs]
        cpu_ratios = [
            c / base_cpu[base][r["round"]] if c is not None and base_cpu[base].get(r["round"]) else None
            for c, r in zip(cpu, rs, strict=True)
        ]
        run_pcts = [_pcts(r["latencies_ms"]) for r in rs]
        out[m] = {
            "baseline": base,
            # every figure per round, and its median with min-max (the tables show these)
            "rounds": {
                "throughput": stat(thr),
                "ratio": stat(
                    [
                        t / own_thr[r["round"]] if own_thr.get(r["round"]) else None
                        for t, r in zip(thr, rs, strict=True)
                    ]
                ),
                "client_cpu_s_per_1k": stat(cpu),
                "client_cpu_ratio": stat(cpu_ratios),
                "backend_cpu_s_per_1k": stat([_per_1k(r.get("backend_cpu_s"), r["ok"]) for r in rs]),
                "lookaside_cpu_s_per_1k": stat([_per_1k(r.get("lookaside_cpu_s"), r["ok"]) for r in rs]),
                **{f"latency_{k}_ms": stat([p[k] for p in run_pcts]) for k, _ in PCTS},
                "connections": stat([r.get("connections") for r in rs]),
            },
            "client_cpu_ratio_per_round": cpu_ratios,
            "runs": len(rs),
            "calls_ok": ok,
            "failed": sum(r["failed"] for r in rs),
            "fail_codes": _merge_counts([r.get("fail_codes", {}) for r in rs]),
            "throughput_per_round": thr,
            "throughput": statistics.median(thr),
            "ratio_per_round": ratios,
            "ratio_to_round_robin": statistics.median(ratios) if ratios else None,
            "ratio_to_aio_round_robin": statistics.median(aio_ratios) if aio_ratios else None,
            "latency_ms": _pcts(lat),
            "per_backend": dict(sorted(per_backend.items())),
            # per run (each run has its own fresh backends); the worst run is reported
            "spread_max_min": max(run_spreads) if run_spreads else None,
            "spread_per_run": run_spreads,
            "connections_per_run": [r.get("connections") for r in rs],
            "connections": statistics.median([r.get("connections") or 0 for r in rs]),
            "client_cpu_s_per_1k": _per_1k(sum(r["client_cpu_s"] for r in rs), ok),
            "backend_cpu_s_per_1k": _per_1k(_sum_opt([r.get("backend_cpu_s") for r in rs]), ok),
            "lookaside_cpu_s_per_1k": _per_1k(_sum_opt([r.get("lookaside_cpu_s") for r in rs]), ok),
            "dial_s": statistics.median([r.get("dial_s") or 0.0 for r in rs]),
            "close_s_max": max((r.get("close_s") or 0.0) for r in rs),
            "info": [r.get("info") for r in rs if r.get("info")],
        }
    return out


def _merge_counts(ds: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _churn_one(r: dict[str, Any]) -> dict[str, Any]:
    tc = r["t_change"]
    new, removed = r["new"], r["removed"]
    first_new = r["first_ts"].get(new)
    last_removed = r["last_ts"].get(removed)
    fails_after = [t for t in r.get("fail_ts", []) if t >= tc]
    seen = r.get("t_lookaside_seen")
    return {
        "source": r.get("source", "static"),
        "lookaside_saw_new_s": (seen - tc) if seen is not None else None,
        "client_after_lookaside_s": (first_new - seen)
        if first_new is not None and seen is not None
        else None,
        "first_call_to_new_s": (first_new - tc) if first_new is not None else None,
        "last_call_to_removed_s": (last_removed - tc) if last_removed is not None else None,
        "removed_stopped_at_s": r["t_kill"] - tc,
        "calls_ok": r["ok"],
        "failed": r["failed"],
        "fail_codes": r.get("fail_codes", {}),
        "failed_after_change": len(fails_after),
        "calls_to_new": r["per_backend"].get(new, 0),
        "calls_to_removed": r["per_backend"].get(removed, 0),
        "throughput": r["ok"] / r["duration_s"] if r["duration_s"] else None,
        "per_backend": r["per_backend"],
        "info": r.get("info"),
    }


_CHURN_TIMES = (
    "first_call_to_new_s",
    "last_call_to_removed_s",
    "lookaside_saw_new_s",
    "client_after_lookaside_s",
)


def summarise_churn(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode over its rounds: the median of each delay ("never" only when no round reached the new
    backend), with min-max in ``rounds``; counts are summed, throughput is the median."""
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_mode.setdefault(r["mode"], []).append(_churn_one(r))
    out = {}
    for mode, ones in by_mode.items():
        v = dict(ones[0])
        rounds: dict[str, Any] = {}
        for k in (*_CHURN_TIMES, "throughput"):
            rounds[k] = stat([o[k] for o in ones])
            v[k] = rounds[k]["median"] if rounds[k] else None
        rounds["never"] = sum(1 for o in ones if o["first_call_to_new_s"] is None)
        v["removed_stopped_at_s"] = min(o["removed_stopped_at_s"] for o in ones)
        for k in ("calls_ok", "failed", "failed_after_change", "calls_to_new", "calls_to_removed"):
            v[k] = sum(o[k] for o in ones)
        v["fail_codes"] = _merge_counts([o["fail_codes"] for o in ones])
        v["runs"] = len(ones)
        v["rounds"] = rounds
        out[mode] = v
    return out


def summarise_small(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for r in runs:
        expected = sorted(set(r.get("backend_stats", {})) | set(r["per_backend"]))
        out[r["mode"]] = {
            "clients": r.get("clients_done"),
            "calls_ok": r["ok"],
            "failed": r["failed"],
            "per_backend": dict(sorted(r["per_backend"].items())),
            "spread_max_min": _spread(r["per_backend"], expected),
            "first_call_backend": r.get("first_call_backend", {}),
            "first_call_spread": _spread(r.get("first_call_backend", {}), expected),
            "connections": r.get("connections"),
            "dial_s_mean": r.get("dial_s_mean"),
            "close_s_mean": r.get("close_s_mean"),
            "close_s_max": r.get("close_s_max"),
            "elapsed_s": r["duration_s"],
            "client_cpu_s_per_1k": _per_1k(r["client_cpu_s"], r["ok"]),
            "latency_ms": _pcts(r["latencies_ms"]),
        }
    return out


def summarise_slow(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for r in runs:
        slow = r.get("slow_backend")
        out[r["mode"]] = {
            "throughput": r["ok"] / r["duration_s"] if r["duration_s"] else None,
            "latency_ms": _pcts(r["latencies_ms"]),
            "calls_ok": r["ok"],
            "failed": r["failed"],
            "share_to_slow": (r["per_backend"].get(slow, 0) / r["ok"]) if r["ok"] else None,
            "per_backend": r["per_backend"],
        }
    return out


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    runs = results["runs"]
    modes = results.get("modes", [])
    by = lambda sc: [r for r in runs if r["scenario"] == sc]  # noqa: E731
    return {
        "steady": summarise_load(by("steady"), modes),
        "single_process": summarise_load(by("single"), modes),
        "churn": summarise_churn(by("churn")),
        "churn_k8s": summarise_churn(by("churn_k8s")),
        "small_clients": summarise_small(by("small")),
        "slow_backend": summarise_slow(by("slow")),
    }


# ------------------------------------------------------------------------------------------ markdown


def _f(v: Any, fmt: str = "{:.0f}", none: str = "–") -> str:
    if v is None:
        return none
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    if isinstance(v, float) and math.isnan(v):
        return none
    return fmt.format(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _mr(st: dict[str, Any] | None, fmt: str = "{:.0f}", scale: float = 1.0) -> str:
    """``median (min–max)`` of a per-round figure; one round: the value alone."""
    if not st:
        return "–"
    med, lo, hi = (st[k] * scale for k in ("median", "min", "max"))
    if st.get("n", 1) < 2:
        return _f(med, fmt)
    return f"{_f(med, fmt)} ({_f(lo, fmt)}–{_f(hi, fmt)})"


def _load_table(summ: dict[str, Any]) -> str:
    header = [
        "mode",
        "client CPU/call × baseline",
        "calls/s",
        "× baseline",
        "client CPU ms/call",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "backend max/min (worst run)",
        "conns",
        "backend CPU ms/call",
        "lookaside CPU ms/call",
        "failed",
    ]
    rows = []
    for m, v in summ.items():
        rd = v.get("rounds") or {}
        base = v.get("baseline", BASELINE)
        rows.append(
            [
                f"`{m}`" + (" (aio)" if base == AIO_BASELINE else ""),
                "1.00x" if m == base else _mr(rd.get("client_cpu_ratio"), "{:.2f}x"),
                _mr(rd.get("throughput")),
                "1.00x" if m == base else _mr(rd.get("ratio"), "{:.2f}x"),
                _mr(rd.get("client_cpu_s_per_1k"), "{:.3f}"),
                _mr(rd.get("latency_p50_ms"), "{:.2f}"),
                _mr(rd.get("latency_p99_ms"), "{:.2f}"),
                _mr(rd.get("latency_p99.9_ms"), "{:.1f}"),
                _f(v["spread_max_min"], "{:.2f}"),
                _f(v["connections"], "{:g}"),
                _mr(rd.get("backend_cpu_s_per_1k"), "{:.3f}"),
                _mr(rd.get("lookaside_cpu_s_per_1k"), "{:.3f}"),
                str(v["failed"]),
            ]
        )
    return _table(header, rows)


def _ms(v: float | None) -> str:
    return _f(v * 1000.0 if v is not None else None, "{:.0f}", none="never")


def _churn_table(summ: dict[str, Any]) -> str:
    rows = []
    for m, v in summ.items():
        rd = v.get("rounds") or {}
        first = _mr(rd.get("first_call_to_new_s"), "{:.0f}", 1000.0) if rd else _ms(v["first_call_to_new_s"])
        if rd.get("never"):
            first = "never" if rd["never"] == v.get("runs", 1) else f"{first}; never in {rd['never']}"
        last = (
            _mr(rd.get("last_call_to_removed_s"), "{:.0f}", 1000.0)
            if rd
            else _ms(v["last_call_to_removed_s"])
        )
        if (v["last_call_to_removed_s"] or 0) >= v["removed_stopped_at_s"] - 0.05:
            last += " (until it stopped)"
        rows.append(
            [
                f"`{m}`",
                first,
                _mr(rd.get("lookaside_saw_new_s"), "{:.0f}", 1000.0),
                _mr(rd.get("client_after_lookaside_s"), "{:.0f}", 1000.0),
                last,
                str(v["calls_to_new"]),
                str(v["failed"]) + (f" {v['fail_codes']}" if v["failed"] else ""),
                _mr(rd.get("throughput")),
            ]
        )
    return _table(
        [
            "mode",
            "first call to new (ms)",
            "lookaside saw it (ms)",
            "client after lookaside (ms)",
            "last call to removed (ms)",
            "calls to new (all rounds)",
            "failed",
            "calls/s",
        ],
        rows,
    )


# Targets from the issue: (label, modes, scenario key, how to read the figure, threshold text, predicate)
_WATCH_MODES = ("lookaside_watch", "aio_lookaside_watch", "interceptor_watch", "aio_interceptor_watch")
_XDS_MODES = ("xds", "aio_xds")


def _ratio(summ: dict[str, Any], mode: str) -> tuple[float | None, str]:
    """A mode's steady-state ratio to its own API's round_robin (aio modes: aio_round_robin when measured)."""
    v = summ.get(mode)
    if not v:
        return None, ""
    if mode.startswith("aio_") and v.get("ratio_to_aio_round_robin") is not None:
        return v["ratio_to_aio_round_robin"], "aio_round_robin"
    return v.get("ratio_to_round_robin"), "round_robin"


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with the measured figure and met/missed (None: not measured)."""
    rows: list[dict[str, Any]] = []
    steady = summary.get("steady") or {}

    def ratio_row(mode: str, target: str, ok: Any) -> None:
        r, base = _ratio(steady, mode)
        if r is None:
            return
        rows.append({"target": f"`{mode}` {target}", "measured": f"{r:.2f}x {base}", "met": bool(ok(r))})

    ratio_row("lookaside_watch", "≥ 0.95x round_robin", lambda r: r >= 0.95)
    ratio_row("aio_lookaside_watch", "≥ 0.95x aio_round_robin", lambda r: r >= 0.95)
    ratio_row("interceptor_watch", "≥ 0.85x round_robin (interceptor modes)", lambda r: r >= 0.85)
    ratio_row("aio_interceptor_watch", "≥ 0.85x aio_round_robin (interceptor modes)", lambda r: r >= 0.85)
    ratio_row("lookaside_per_call", "≥ 0.5x round_robin", lambda r: r >= 0.5)
    ratio_row(
        "interceptor_per_call",
        "≥ 0.5x round_robin (per_call target; one Resolve per call)",
        lambda r: r >= 0.5,
    )
    pc, watch, b = (
        steady.get(m, {}).get("ratio_to_round_robin")
        for m in ("lookaside_per_call", "lookaside_watch", "lookaside_per_call_batched")
    )
    if None not in (pc, watch, b):
        rows.append(
            {
                "target": "`lookaside_per_call_batched` closer to watch than per_call is",
                "measured": f"{b:.2f}x (per_call {pc:.2f}x, watch {watch:.2f}x)",
                "met": abs(watch - b) < abs(watch - pc),
            }
        )
    ratio_row("xds", "≈ 1.0x round_robin within noise (≥ 0.90x)", lambda r: r >= 0.90)
    ratio_row("aio_xds", "≈ 1.0x aio_round_robin within noise (≥ 0.90x)", lambda r: r >= 0.90)
    ratio_row("lookaside_xds_mode", "≈ 1.0x round_robin within noise (≥ 0.90x)", lambda r: r >= 0.90)
    ratio_row("aio_lookaside_xds_mode", "≈ 1.0x aio_round_robin within noise (≥ 0.90x)", lambda r: r >= 0.90)
    for mode, limit in (
        ("lookaside_watch", 1.05),
        ("interceptor_watch", 1.10),
        ("aio_lookaside_watch", 1.05),
        ("aio_interceptor_watch", 1.10),
        ("lookaside_xds_mode", 1.05),
        ("aio_lookaside_xds_mode", 1.05),
    ):
        c = _cpu_ratio(steady, mode)
        if c is not None:
            rows.append(
                {
                    "target": f"`{mode}` client CPU per call ≤ {limit:.2f}x `{baseline_of(mode)}`'s",
                    "measured": f"{c:.2f}x",
                    "met": c <= limit,
                }
            )
    for mode, noop in (
        ("interceptor_watch", "noop_interceptor"),
        ("aio_interceptor_watch", "aio_noop_interceptor"),
    ):
        c, floor = _cpu_ratio(steady, mode), _cpu_ratio(steady, noop)
        if c is not None and floor is not None:
            rows.append(
                {
                    "target": f"(context) `{mode}` client CPU per call over grpc's own interceptor machinery "
                    f"(`{noop}`, {floor:.2f}x `{baseline_of(mode)}`'s) ≤ 1.05x",
                    "measured": f"{c / floor:.2f}x",
                    "met": c / floor <= 1.05,
                }
            )
    rr_modes = [
        m
        for m in steady
        if m not in ("direct", "round_robin_redial")
        and not m.startswith("lookaside_watch_")
        and steady[m].get("spread_max_min") is not None
    ]
    if rr_modes:
        worst = max(rr_modes, key=lambda m: steady[m]["spread_max_min"])
        missed = [m for m in rr_modes if steady[m]["spread_max_min"] > 1.01]
        rows.append(
            {
                "target": "round-robin spread max/min ≤ 1.01 (steady, worst run, rr modes but redial)",
                "measured": f"worst `{worst}` {_f(steady[worst]['spread_max_min'], '{:.2f}')}"
                + (f"; over 1.01: {', '.join(f'`{m}`' for m in missed)}" if missed else ""),
                "met": not missed,
            }
        )
    for key, label in (("churn", "static file"), ("churn_k8s", "Kubernetes")):
        ch = summary.get(key) or {}
        for mode, limit in [(m, 0.100) for m in _WATCH_MODES] + [(m, 0.050) for m in _XDS_MODES]:
            v = ch.get(mode)
            if not v:
                continue
            d = v["first_call_to_new_s"]
            rows.append(
                {
                    "target": f"churn ({label}): `{mode}` reaches the new backend < {limit * 1000:.0f} ms",
                    "measured": _ms(d) + " ms",
                    "met": d is not None and d < limit,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------- compare

#: (scenario key, figure label, how to read it from a mode's summary, higher is better)
_COMPARED: list[tuple[str, str, Any, bool]] = [
    ("steady", "calls/s", lambda v: v.get("throughput"), True),
    (
        "steady",
        "× baseline",
        lambda v: (
            (v.get("rounds") or {}).get("ratio", {}).get("median")
            if (v.get("rounds") or {}).get("ratio")
            else v.get("ratio_to_round_robin")
        ),
        True,
    ),
    ("steady", "client CPU s/1k", lambda v: v.get("client_cpu_s_per_1k"), False),
    ("steady", "client CPU × baseline", None, False),  # computed from client CPU when missing
    ("steady", "p50 ms", lambda v: _lat(v, "p50"), False),
    ("steady", "p99 ms", lambda v: _lat(v, "p99"), False),
    ("churn", "first call to new ms", lambda v: _s_ms(v.get("first_call_to_new_s")), False),
    ("churn_k8s", "first call to new ms", lambda v: _s_ms(v.get("first_call_to_new_s")), False),
    ("slow_backend", "p99 ms", lambda v: v.get("latency_ms", {}).get("p99"), False),
]


_RATIOS = ("× baseline", "client CPU × baseline")


def _lat(v: dict[str, Any], key: str) -> float | None:
    """The median over rounds of a latency percentile (older files: the pooled percentile)."""
    st = (v.get("rounds") or {}).get(f"latency_{key}_ms")
    return float(st["median"]) if st else v.get("latency_ms", {}).get(key)


def _s_ms(v: float | None) -> float | None:
    return None if v is None else v * 1000.0


def _cpu_ratio(steady: dict[str, Any], mode: str) -> float | None:
    v = steady.get(mode) or {}
    st = (v.get("rounds") or {}).get("client_cpu_ratio")
    if st:
        return float(st["median"])
    base = steady.get(baseline_of(mode)) or {}
    c, cb = v.get("client_cpu_s_per_1k"), base.get("client_cpu_s_per_1k")
    return c / cb if c is not None and cb else None


def figures(summary: dict[str, Any]) -> dict[tuple[str, str, str], float]:
    """{(scenario, mode, figure): value} from a summary (this format or an older results.json's)."""
    out: dict[tuple[str, str, str], float] = {}
    for scenario, label, get, _ in _COMPARED:
        for mode, v in (summary.get(scenario) or {}).items():
            val = _cpu_ratio(summary.get("steady") or {}, mode) if get is None else get(v)
            if val is not None and not (isinstance(val, float) and (math.isnan(val) or math.isinf(val))):
                out[(scenario, mode, label)] = float(val)
    return out


def compare(old: dict[str, Any], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each figure of this run against the same figure of an older results.json (its summary)."""
    old_summary = old.get("summary") or summarise(old)
    before, now = figures(old_summary), figures(summary)
    better = {label: hib for _, label, _, hib in _COMPARED}
    rows = []
    for key, new in now.items():
        if key not in before or (key[2] in _RATIOS and key[1] in (BASELINE, AIO_BASELINE)):
            continue
        was = before[key]
        change = (new - was) / was if was else None
        rows.append(
            {
                "scenario": key[0],
                "mode": key[1],
                "figure": key[2],
                "old": was,
                "new": new,
                "change": change,
                "worse": change is not None and (change < 0 if better[key[2]] else change > 0),
            }
        )
    return rows


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def compare_text(rows: list[dict[str, Any]], old_path: str, threshold: float = 0.10) -> str:
    """The comparison as a markdown table; changes beyond ``threshold`` for the worse are marked."""
    if not rows:
        return f"Nothing to compare with {old_path} (no figure in common)."
    body = []
    for r in rows:
        ch = r["change"]
        mark = " **worse**" if r["worse"] and ch is not None and abs(ch) > threshold else ""
        body.append(
            [
                r["scenario"],
                f"`{r['mode']}`",
                r["figure"],
                _num(r["old"]),
                _num(r["new"]),
                (f"{ch * 100:+.0f} %" if ch is not None else "–") + mark,
            ]
        )
    return (
        f"Against {old_path} (changes over {threshold * 100:.0f} % for the worse are marked; run-to-run noise"
        " on 2 shared cores is ±10–25 % for throughput, less for CPU ratios):\n\n"
        + _table(["scenario", "mode", "figure", "old", "new", "change"], body)
    )


def markdown(results: dict[str, Any], summary: dict[str, Any]) -> str:
    mi, st = results["machine"], results["settings"]
    out = [
        "# lookaside-grpc benchmark results",
        "",
        f"Machine (absolute numbers are this machine's only): {mi.get('nproc')} CPUs"
        f"{' (' + mi['cpu'] + ')' if mi.get('cpu') else ''}, {mi.get('platform')}, Python {mi.get('python')},"
        f" grpcio {mi.get('grpcio')}. Started {results.get('started')},"
        f" took {results.get('elapsed_s', 0):.0f} s"
        f"{' (--quick)' if st.get('quick') else ''}.",
        "",
        f"Settings: {st['backends']} backends, concurrency {st['concurrency']}, up to {st['calls']} calls or"
        f" {st['time_limit']} s per run, {st['rounds']} round(s) with rotating mode order; redial every"
        f" {st['redial_every']} calls; batch {st['batch']}."
        " Every figure is the median over rounds with its min–max in brackets; ratios are per round, to the"
        " same round's `round_robin` (grpc.aio modes, marked (aio): to `aio_round_robin`). Client CPU per"
        " call (`time.process_time()` of the client process over the measured phase) is the headline figure"
        " for client overhead: steadier than throughput on shared cores."
        " Everything (client, lookaside server, backends) shares the same CPUs.",
    ]
    if results.get("compare") is not None:
        out += ["", "## Change against an earlier run", "", results["compare_text"]]
    if results.get("skipped_modes"):
        out += [
            "",
            "Skipped modes: " + ", ".join(f"`{k}` ({v})" for k, v in results["skipped_modes"].items()),
        ]
    if results.get("errors"):
        out += [
            "",
            "Errors: " + "; ".join(f"{e['scenario']}/{e['mode']}: {e['error']}" for e in results["errors"]),
        ]
    tg = summary.get("targets") or []
    if tg:
        out += [
            "",
            "## Targets",
            "",
            "From the issue; ratios are steady-state medians over rounds (one process per backend), grpc.aio"
            " modes against `aio_round_robin`. Quick runs are noisy (±10–25 %): judge on the full run.",
            "",
            _table(
                ["target", "measured", "status"],
                [[t["target"], t["measured"], "met" if t["met"] else "**missed**"] for t in tg],
            ),
        ]
    if summary["steady"]:
        out += ["", "## Steady state (one process per backend)", "", _load_table(summary["steady"])]
        redial = summary["steady"].get("round_robin_redial")
        if redial and redial["info"]:
            infos = redial["info"]
            n = sum(i.get("redials", 0) for i in infos)
            cmax = max(i.get("close_s_max", 0) for i in infos)
            dmax = max(i.get("dial_s_max", 0) for i in infos)
            ctot = sum(i.get("close_s_total", 0) for i in infos)
            out += [
                "",
                f"`round_robin_redial`: {n} redials; blocking dial max {dmax * 1000:.0f} ms; closing the old"
                f" channel took up to {cmax * 1000:.0f} ms (total {ctot:.2f} s of worker time),"
                " paid by a worker"
                " thread in the measured phase.",
            ]
    if summary["single_process"]:
        out += [
            "",
            "## Steady state, all backends in one process (several ports)",
            "",
            _load_table(summary["single_process"]),
        ]
    if summary["churn"]:
        out += [
            "",
            "## Endpoint churn",
            "",
            f"At +{st['churn_change_at']:.2f} s into a {st['churn_duration']:g} s run (concurrency"
            f" {st['churn_concurrency']}) the static file swaps one backend"
            " for a new one (already listening,"
            f" like a ready pod); the removed backend keeps serving for {st['churn_grace']:.2f} s,"
            " then stops."
            " round_robin_redial re-reads the file at each redial (like DNS re-resolution). Delays from the"
            ' change (the file write), by call start time; "lookaside saw it" is when a Watch opened by the'
            f" harness got the new set (the server polls the file every {POLL_INTERVAL * 1000:.0f} ms),"
            ' "client after lookaside" the rest (slightly negative when the harness\'s Watch, one more'
            " subscriber, was served after the client).",
            "",
            _churn_table(summary["churn"]),
        ]
    if summary.get("churn_k8s"):
        out += [
            "",
            "## Endpoint churn through Kubernetes (EndpointSlices)",
            "",
            "The same swap, but the lookaside server reads EndpointSlices (`--source endpointslices"
            " --kubeconfig ...`) from a Kubernetes API test server (`lookaside_dev.kube_api`, in the harness"
            " process, LIST+WATCH over HTTP): one slice per backend; at the change the harness applies the"
            " new backend's slice (ready) and marks the removed one's endpoint terminating (ready false,"
            " serving true), then deletes that slice when the backend stops.",
            "",
            _churn_table(summary["churn_k8s"]),
        ]
    if summary["small_clients"]:
        out += [
            "",
            "## Many small clients",
            "",
            f"{st['small_clients']} short-lived clients ({st['small_parallel']} at a time),"
            " each a new channel"
            f" making {st['small_calls']} calls; round_robin uses its own subchannel pool per client.",
            "",
        ]
        rows = []
        for m, v in summary["small_clients"].items():
            rows.append(
                [
                    f"`{m}`",
                    str(v["clients"]),
                    " / ".join(str(c) for c in v["per_backend"].values()),
                    _f(v["spread_max_min"], "{:.2f}"),
                    _f(v["first_call_spread"], "{:.2f}"),
                    _f(v["connections"], "{:g}"),
                    _f(v["dial_s_mean"] * 1000 if v["dial_s_mean"] is not None else None, "{:.1f}"),
                    _f(v["close_s_mean"] * 1000 if v["close_s_mean"] is not None else None, "{:.1f}"),
                    _f(v["elapsed_s"], "{:.2f}"),
                    str(v["failed"]),
                ]
            )
        out.append(
            _table(
                [
                    "mode",
                    "clients",
                    "calls per backend",
                    "max/min",
                    "first-call max/min",
                    "conns",
                    "dial ms (mean)",
                    "close ms (mean)",
                    "elapsed s",
                    "failed",
                ],
                rows,
            )
        )
    if summary["slow_backend"]:
        out += [
            "",
            "## One slow backend",
            "",
            f"One of {st['backends']} backends adds {st['slow_delay'] * 1000:.0f} ms per call; concurrency"
            f" {st['concurrency']}.",
            "",
        ]
        rows = []
        slow = summary["slow_backend"]
        base = slow.get("lookaside_watch") or slow.get("round_robin")
        base_name = "lookaside_watch" if "lookaside_watch" in slow else "round_robin"
        for m, v in slow.items():
            lat = v["latency_ms"]
            vs = "–"
            if base is not None and base["latency_ms"]["p99"] and lat["p99"] is not None:
                vs = f"{lat['p99'] / base['latency_ms']['p99']:.2f}x"
            rows.append(
                [
                    f"`{m}`",
                    _f(v["throughput"]),
                    _f(lat["p50"], "{:.2f}"),
                    _f(lat["p90"], "{:.2f}"),
                    _f(lat["p99"], "{:.2f}"),
                    _f(lat["p99.9"], "{:.2f}"),
                    vs,
                    _f(v["share_to_slow"] * 100 if v["share_to_slow"] is not None else None, "{:.1f}%"),
                    str(v["calls_ok"]),
                    str(v["failed"]),
                ]
            )
        out.append(
            _table(
                [
                    "mode",
                    "calls/s",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "p99.9 ms",
                    f"p99 × `{base_name}`",
                    "calls to slow",
                    "calls",
                    "failed",
                ],
                rows,
            )
        )
    out += [
        "",
        "## Plots",
        "",
        "![throughput](throughput.png)",
        "",
        "![latency](latency.png)",
        "",
        "![spread](spread.png)",
        "",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ plots


def _mode_rows(ax: Any, modes: list[str]) -> None:
    """Modes as rows, first on top: horizontal bars keep every name readable however many modes there are."""
    ax.set_yticks(range(len(modes)))
    ax.set_yticklabels(modes, fontsize=9)
    ax.set_ylim(len(modes) - 0.5, -0.5)
    ax.tick_params(axis="y", length=0)


def _legend_above(ax: Any, ncol: int) -> None:
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=ncol, fontsize=8, frameon=False)


def plot_figures(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """The figures of a summary as ``(file name, matplotlib figure)``: throughput, latency and spread, each
    with one row per mode (names on the y axis, values written beside the bars, legends above the plot), so
    no label can overlap another (``tests/test_benchmark_plots.py`` checks that on synthetic data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figs: list[tuple[str, Any]] = []

    def no_data(name: str, what: str) -> None:
        """A figure saying there is nothing to show (a run without those scenarios writes every file)."""
        fig, ax = plt.subplots(figsize=(6, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no {what} in this run", ha="center", va="center", fontsize=11)
        figs.append((name, fig))

    # throughput: one row per mode, a bar per variant, "calls/s  ratio" beside each bar
    variants = [
        (k, label)
        for k, label in (
            ("steady", "one process per backend"),
            ("single_process", "all backends in one process"),
        )
        if summary.get(k)
    ]
    modes = list(dict.fromkeys(m for k, _ in variants for m in summary[k]))
    if modes:
        h = 0.8 / len(variants)
        fig, ax = plt.subplots(figsize=(10, 1.4 + 0.26 * len(modes) * len(variants) + 0.1 * len(modes)))
        top = max((summary[k][m]["throughput"] or 0.0) for k, _ in variants for m in summary[k]) or 1.0
        for i, (key, label) in enumerate(variants):
            s = summary[key]
            rows = [(j, m) for j, m in enumerate(modes) if m in s]
            ys = [j - 0.4 + h * (i + 0.5) for j, _ in rows]
            xs = [s[m]["throughput"] or 0.0 for _, m in rows]
            ax.barh(ys, xs, h * 0.92, label=label, color=f"C{i}")
            for y, x, (_, m) in zip(ys, xs, rows, strict=True):
                r = s[m].get("ratio_to_round_robin")
                text = f"{x:,.0f}" + (f"  {r:.2f}x" if r is not None else "")
                ax.text(x + top * 0.01, y, text, va="center", ha="left", fontsize=7.5)
        _mode_rows(ax, modes)
        ax.set_xlim(0, top * 1.22)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel(
            "calls/s on this machine (beside each bar: calls/s and the ratio to the same round's round_robin)"
        )
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_title("Throughput", loc="left", pad=24, fontsize=11)
        _legend_above(ax, len(variants))
        figs.append(("throughput.png", fig))
    else:
        no_data("throughput.png", "steady-state runs")

    # latency: one row per mode, a marker per percentile on a log axis (a dot plot: no bars to crowd)
    panels = [
        (k, t)
        for k, t in (("steady", "steady state"), ("slow_backend", "one slow backend"))
        if summary.get(k)
    ]
    if panels:
        rows_max = max(len(summary[k]) for k, _ in panels)
        fig, axes = plt.subplots(
            1,
            len(panels),
            figsize=(6.5 * len(panels), 1.4 + 0.32 * rows_max),
            squeeze=False,
            layout="constrained",
        )
        markers = ("o", "s", "D", "^")
        for ax, (key, title) in zip(axes[0], panels, strict=True):
            s = summary[key]
            ms = list(s)
            for j, m in enumerate(ms):
                vals = [v for v in (s[m]["latency_ms"].get(name) for name, _ in PCTS) if v]
                if vals:
                    ax.plot([min(vals), max(vals)], [j, j], color="0.75", lw=1.5, zorder=1)
            for k, (name, _) in enumerate(PCTS):
                pts = [(s[m]["latency_ms"].get(name), j) for j, m in enumerate(ms)]
                pts = [(v, j) for v, j in pts if v]
                ax.scatter(
                    [v for v, _ in pts],
                    [j for _, j in pts],
                    s=22,
                    marker=markers[k % len(markers)],
                    color=f"C{k}",
                    label=name,
                    zorder=2,
                )
            _mode_rows(ax, ms)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(axis="x", which="both", alpha=0.25)
            ax.set_xlabel("latency in ms (log scale)")
            ax.set_title(f"Latency percentiles: {title}", loc="left", pad=24, fontsize=11)
            _legend_above(ax, len(PCTS))
        figs.append(("latency.png", fig))
    else:
        no_data("latency.png", "steady-state or slow-backend runs")

    # spread: one row per mode, the share of calls per backend stacked to 100 %, max/min written beside it
    panels = [
        (k, t)
        for k, t in (
            ("steady", "Steady state: calls per backend"),
            ("small_clients", "Many small clients: calls per backend"),
        )
        if summary.get(k)
    ]
    if panels:
        rows_max = max(len(summary[k]) for k, _ in panels)
        fig, axes = plt.subplots(
            1,
            len(panels),
            figsize=(6.5 * len(panels), 1.5 + 0.32 * rows_max),
            squeeze=False,
            layout="constrained",
        )
        for ax, (key, title) in zip(axes[0], panels, strict=True):
            s = summary[key]
            ms = list(s)
            backends = sorted({b for m in ms for b in s[m]["per_backend"]})
            left = np.zeros(len(ms))
            tot = np.array([max(1, sum(s[m]["per_backend"].values())) for m in ms], dtype=float)
            for i, b in enumerate(backends):
                xs = np.array([s[m]["per_backend"].get(b, 0) for m in ms], dtype=float) / tot * 100
                ax.barh(range(len(ms)), xs, 0.7, left=left, label=b.rsplit(":", 1)[-1], color=f"C{i % 10}")
                left += xs
            for j, m in enumerate(ms):
                label = "max/min " + _f(s[m]["spread_max_min"], "{:.2f}")
                if "first_call_spread" in s[m]:
                    label += f", first calls {_f(s[m]['first_call_spread'], '{:.2f}')}"
                ax.text(
                    1.02, j, label, transform=ax.get_yaxis_transform(), va="center", ha="left", fontsize=7.5
                )
            _mode_rows(ax, ms)
            ax.set_xlim(0, 100)
            ax.set_xlabel("% of calls per backend")
            ax.set_title(title, loc="left", pad=40, fontsize=11)
            ax.legend(
                loc="lower left",
                bbox_to_anchor=(0.0, 1.01),
                ncol=min(len(backends), 6),
                fontsize=8,
                frameon=False,
                title="backend port:",
                title_fontsize=8,
                alignment="left",
            )
        figs.append(("spread.png", fig))
    else:
        no_data("spread.png", "steady-state or small-client runs")
    return figs


def plots(summary: dict[str, Any], out: Path) -> list[Path]:
    """Write the figures of :func:`plot_figures` into ``out``."""
    import matplotlib.pyplot as plt

    files = []
    for name, fig in plot_figures(summary):
        files.append(out / name)
        fig.savefig(files[-1], dpi=100, bbox_inches="tight", pad_inches=0.15)
        plt.close(fig)
    return files


def write_all(results: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(results)
    summary["targets"] = targets(summary)
    results["summary"] = summary
    raw = json.loads(json.dumps(results, default=str))
    for r in raw["runs"]:  # keep results.json small: percentiles are in the summary
        r["latency_samples"] = len(r.pop("latencies_ms", []))
    (out / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    if results.get("compare_with"):
        old_path = results["compare_with"]
        try:
            old = json.loads(Path(old_path).read_text())
            results["compare"] = compare(old, summary)
            results["compare_text"] = compare_text(results["compare"], old_path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            results["compare"] = []
            results["compare_text"] = f"Could not compare with {old_path}: {e!r}"
        raw["compare"] = results["compare"]
        (out / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    (out / "results.md").write_text(markdown(results, summary))
    pngs = plots(summary, out)
    return {"json": out / "results.json", "md": out / "results.md", **{p.stem: p for p in pngs}}
