"""The benchmark figures (benchmarks/_report.py) on synthetic data: every label readable, none overlapping."""

from __future__ import annotations

import itertools
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _report

#: The modes of a full run, in the order the runner lists them.
MODES = [
    "direct",
    "round_robin",
    "round_robin_redial",
    "lookaside_per_call",
    "lookaside_per_call_batched",
    "lookaside_watch",
    "lookaside_watch_least_request",
    "lookaside_watch_peak_ewma",
    "lookaside_watch_weighted",
    "aio_round_robin",
    "aio_lookaside_watch",
    "interceptor_watch",
    "interceptor_per_call",
    "aio_interceptor_watch",
    "xds",
    "aio_xds",
]
PORTS = ["127.0.0.1:46273", "127.0.0.1:50941", "127.0.0.1:60309"]


def _load(rng: random.Random, modes: list[str]) -> dict[str, Any]:
    out = {}
    for m in modes:
        thr = rng.uniform(800, 2900)
        p50 = rng.uniform(1.5, 12)
        counts = [rng.randint(9000, 11000) for _ in PORTS] if m != "direct" else [30000, 0, 0]
        out[m] = {
            "throughput": thr,
            "ratio_to_round_robin": thr / 2480,
            "latency_ms": {"p50": p50, "p90": p50 * 2.5, "p99": p50 * 4.5, "p99.9": p50 * 6},
            "per_backend": dict(zip(PORTS, counts, strict=True)),
            "spread_max_min": max(counts) / min(counts) if min(counts) else float("inf"),
        }
    return out


def synthetic_summary(seed: int = 7) -> dict[str, Any]:
    """A summary shaped like a full run's (16 modes, every scenario the plots show)."""
    rng = random.Random(seed)
    small = _load(rng, [m for m in MODES if m not in ("direct", "round_robin_redial") and "aio" not in m])
    for m in small.values():
        m["first_call_spread"] = rng.uniform(1.0, 2.0)
    return {
        "steady": _load(rng, MODES),
        "single_process": _load(rng, MODES),
        "slow_backend": _load(rng, MODES),
        "small_clients": small,
    }


def overlapping_texts(fig: Any) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts of ``fig`` whose drawn boxes overlap."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip() and t.get_alpha() != 0:
            box = t.get_window_extent(renderer)
            if box.width > 0 and box.height > 0:
                boxes.append((t.get_text(), box.expanded(0.98, 0.9)))  # touching edges are fine
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


@pytest.mark.parametrize("summary", [synthetic_summary(), {**synthetic_summary(), "single_process": {}}])
def test_no_label_overlaps_another(summary: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    figs = _report.plot_figures(summary)
    assert [name for name, _ in figs] == ["throughput.png", "latency.png", "spread.png"]
    try:
        for name, fig in figs:
            assert overlapping_texts(fig) == [], name
            every_mode = {t.get_text() for ax in fig.axes for t in ax.get_yticklabels()}
            assert set(summary["steady"]) <= every_mode, name  # each mode named on its row
    finally:
        for _, fig in figs:
            plt.close(fig)


def test_every_file_written_without_data(tmp_path: Path) -> None:
    empty = {"steady": {}, "single_process": {}, "slow_backend": {}, "small_clients": {}}
    files = _report.plots(empty, tmp_path)
    assert [f.name for f in files] == ["throughput.png", "latency.png", "spread.png"]


def test_plots_written(tmp_path: Path) -> None:
    files = _report.plots(synthetic_summary(), tmp_path)
    assert [f.name for f in files] == ["throughput.png", "latency.png", "spread.png"]
    assert all(f.stat().st_size > 10_000 for f in files)
    # to look at them: LOOKASIDE_PLOTS_DIR=/some/dir pytest tests/test_benchmark_plots.py
    if os.environ.get("LOOKASIDE_PLOTS_DIR"):
        for f in files:
            shutil.copyfile(f, Path(os.environ["LOOKASIDE_PLOTS_DIR"]) / f.name)
