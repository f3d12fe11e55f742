"""Smoke test of the benchmark harness at a tiny size: it runs end to end and writes well-formed results.

No timing assertions: only the structure of results.json / results.md and that the plots are PNG files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("numpy")

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIME_BOUND = 240.0  # a hang guard, not a speed figure: 32 runs of 2 s (quiet machine) to 4 s (busy)


def _lookaside_available() -> bool:
    try:
        import lookaside_grpc
    except ImportError:
        return False
    import importlib.util

    return callable(getattr(lookaside_grpc, "channel", None)) and (
        importlib.util.find_spec("lookaside_server.__main__") is not None
    )


@pytest.mark.timeout(90)
def test_benchmark_harness_tiny_run(tmp_path: Path) -> None:
    lookaside = _lookaside_available()
    modes = ["round_robin", "round_robin_redial"] + (
        ["lookaside_watch", "interceptor_watch", "xds"] if lookaside else []
    )
    out = tmp_path / "results"
    # an earlier run's results.json in the old format (no per-round figures): --compare still reads it
    old = tmp_path / "old.json"
    old.write_text(
        json.dumps(
            {
                "summary": {
                    "steady": {
                        "round_robin": {
                            "throughput": 1000.0,
                            "ratio_to_round_robin": 1.0,
                            "client_cpu_s_per_1k": 0.3,
                            "latency_ms": {"p50": 5.0, "p90": 9.0, "p99": 20.0, "p99.9": 30.0},
                        }
                    }
                }
            }
        )
    )
    argv = [
        sys.executable,
        "-m",
        "benchmarks",
        "run",
        "--calls",
        "300",
        "--time-limit",
        "3",
        "--concurrency",
        "4",
        "--backends",
        "2",
        "--rounds",
        "2",
        "--churn-rounds",
        "1",
        "--compare",
        str(old),
        "--single-rounds",
        "1",
        "--redial-every",
        "100",
        "--modes",
        ",".join(modes),
        "--scenarios",
        "steady,single,churn,churn_k8s,small,slow",
        "--small-clients",
        "6",
        "--churn-duration",
        "1.2",
        "--slow-calls",
        "200",
        "--out",
        str(out),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIME_BOUND)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the harness stops all its children on SIGTERM
        try:
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(f"benchmark harness took more than {TIME_BOUND}s\n{stderr.decode()[-3000:]}")
    assert proc.returncode == 0, stderr.decode()[-3000:]

    data = json.loads((out / "results.json").read_text())
    for key in ("machine", "settings", "modes", "skipped_modes", "runs", "errors", "summary", "elapsed_s"):
        assert key in data, key
    assert data["errors"] == [], data["errors"]
    for key in ("nproc", "python", "grpcio", "platform"):
        assert key in data["machine"]
    assert set(data["modes"]) == set(modes)
    summary = data["summary"]
    for key in ("steady", "single_process", "churn", "churn_k8s", "small_clients", "slow_backend", "targets"):
        assert key in summary, key
    for variant in ("steady", "single_process"):
        assert set(summary[variant]) == set(modes)
        for mode, v in summary[variant].items():
            for k in (
                "throughput",
                "ratio_to_round_robin",
                "latency_ms",
                "per_backend",
                "spread_max_min",
                "connections",
                "client_cpu_s_per_1k",
                "backend_cpu_s_per_1k",
                "failed",
            ):
                assert k in v, (variant, mode, k)
            assert set(v["latency_ms"]) == {"p50", "p90", "p99", "p99.9"}
            assert v["calls_ok"] > 0
            rounds = v["rounds"]  # every figure per round: median with min-max
            for k in ("throughput", "ratio", "client_cpu_s_per_1k", "client_cpu_ratio", "latency_p99_ms"):
                assert rounds[k] is not None, (variant, mode, k)
                assert rounds[k]["min"] <= rounds[k]["median"] <= rounds[k]["max"], (variant, mode, k)
        assert summary[variant]["round_robin"]["ratio_to_round_robin"] == pytest.approx(1.0)
        assert summary[variant]["round_robin"]["rounds"]["client_cpu_ratio"]["median"] == pytest.approx(1.0)
    assert summary["steady"]["round_robin"]["rounds"]["throughput"]["n"] == 2
    # --compare: each figure against the earlier run
    compared = {(c["scenario"], c["mode"], c["figure"]) for c in data["compare"]}
    assert ("steady", "round_robin", "calls/s") in compared
    assert ("steady", "round_robin", "client CPU s/1k") in compared
    assert summary["steady"]["round_robin"]["connections"] == 2
    assert summary["churn"]["round_robin"]["first_call_to_new_s"] is None  # never re-resolves
    for mode, v in summary["churn"].items():
        assert {"first_call_to_new_s", "last_call_to_removed_s", "failed"} <= set(v), mode
    if lookaside:
        for mode in ("lookaside_watch", "interceptor_watch", "xds"):  # they follow the change, also via k8s
            assert summary["churn"][mode]["first_call_to_new_s"] is not None, mode
            assert summary["churn_k8s"][mode]["first_call_to_new_s"] is not None, mode
            assert summary["steady"][mode]["failed"] == 0, mode
        assert set(summary["churn_k8s"]) == {"lookaside_watch", "interceptor_watch", "xds"}
        assert "xds" in summary["small_clients"] and "interceptor_watch" in summary["slow_backend"]
        assert any(t["target"].startswith("`lookaside_watch`") for t in summary["targets"])
        # the interceptor balanced its calls (did not fall back to its original one-backend channel)
        for run in data["runs"]:
            if run["mode"] == "interceptor_watch" and run["scenario"] == "steady":
                assert not run["info"]["fallbacks"], run["info"]
    assert "round_robin" in summary["small_clients"]
    assert summary["small_clients"]["round_robin"]["clients"] == 6
    assert "round_robin" in summary["slow_backend"]

    md = (out / "results.md").read_text()
    assert "## Steady state" in md and "| mode |" in md and "|---|" in md
    assert "## Change against an earlier run" in md and "client CPU/call × baseline" in md
    for section in ("## Endpoint churn", "## Many small clients", "## One slow backend") + (
        ("## Targets", "## Endpoint churn through Kubernetes") if lookaside else ()
    ):
        assert section in md
    for name in ("throughput", "latency", "spread"):
        png = out / f"{name}.png"
        assert png.exists(), png
        assert png.read_bytes()[:8] == PNG_MAGIC
