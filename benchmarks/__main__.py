"""``python -m benchmarks run [--quick] [--calls N] [--concurrency C] [--backends B] [--out DIR] ...``"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from benchmarks._procs import install_signal_handlers


def _version() -> str:
    try:
        return metadata.version("lookaside-grpc")
    except metadata.PackageNotFoundError:
        return "not installed"


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s (lookaside-grpc {_version()})")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run the benchmark and write results (json, md, png)")
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in under 2 minutes")
    p.add_argument("--calls", type=int, help="calls per steady-state run (bounded by --time-limit too)")
    p.add_argument("--time-limit", type=float, help="seconds per steady-state run at most")
    p.add_argument("--concurrency", type=int, help="client threads (sync) or tasks (aio)")
    p.add_argument("--backends", type=int, help="number of Greet backends")
    p.add_argument("--rounds", type=int, help="steady-state rounds (each runs every mode once)")
    p.add_argument("--single-rounds", type=int, help="rounds of the all-backends-in-one-process variant")
    p.add_argument("--redial-every", type=int, help="round_robin_redial: re-dial every K calls")
    p.add_argument("--batch", type=int, help="lookaside_per_call_batched: picks per Resolve")
    p.add_argument("--modes", type=_csv, help="comma-separated modes (default: all registered)")
    p.add_argument(
        "--scenarios",
        type=_csv,
        help="comma-separated of steady,single,churn,churn_k8s,small,slow (default: all)",
    )
    p.add_argument("--small-clients", type=int, help="number of short-lived clients")
    p.add_argument("--churn-duration", type=float, help="seconds per churn run")
    p.add_argument(
        "--churn-rounds", type=int, help="rounds of the churn scenarios (each runs every mode once)"
    )
    p.add_argument(
        "--compare",
        type=Path,
        metavar="OLD/results.json",
        help="print each figure's change against an earlier run's results.json",
    )
    p.add_argument("--slow-calls", type=int, help="calls per slow-backend run")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/)")
    p.add_argument("--list-modes", action="store_true", help="print the registered modes and exit")
    args = parser.parse_args(argv)

    from benchmarks._modes import MODES

    if args.list_modes:
        for name, m in MODES.items():
            print(f"{name:28s} {m.kind:5s} {m.description}")
        return 0
    from benchmarks import _report, _runner

    s = _runner.Settings.for_args(args.quick)
    for attr in (
        "calls",
        "time_limit",
        "concurrency",
        "backends",
        "rounds",
        "single_rounds",
        "redial_every",
        "batch",
        "modes",
        "scenarios",
        "small_clients",
        "churn_duration",
        "churn_rounds",
        "slow_calls",
        "out",
    ):
        v = getattr(args, attr)
        if v is not None:
            setattr(s, attr, v)
    if (
        args.modes is not None
    ):  # the chosen modes run in every scenario that fits them (not --quick's subsets)
        for attr in (
            "steady_modes",
            "single_modes",
            "churn_modes",
            "churn_k8s_modes",
            "small_modes",
            "slow_modes",
        ):
            setattr(s, attr, None)
    if args.churn_duration is not None:
        s.churn_change_at = min(s.churn_change_at, s.churn_duration / 3)
        s.churn_grace = min(s.churn_grace, s.churn_duration / 3)
    unknown = [m for m in s.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; known: {list(MODES)}")
    bad = [x for x in s.scenarios if x not in _runner.SCENARIOS]
    if bad:
        parser.error(f"unknown scenarios {bad}; known: {_runner.SCENARIOS}")
    if s.backends < 2:
        parser.error("--backends must be at least 2")
    s.out = s.out.resolve()
    if args.compare is not None and not args.compare.is_file():
        parser.error(f"--compare: no such file {args.compare}")
    install_signal_handlers()
    try:
        results = _runner.run(s)
    except KeyboardInterrupt:
        print("interrupted; all child processes stopped", file=sys.stderr)
        return 130
    if args.compare is not None:
        results["compare_with"] = str(args.compare)
    files = _report.write_all(results, s.out)
    print((s.out / "results.md").read_text())
    print("\nwrote " + ", ".join(str(f) for f in files.values()), file=sys.stderr)
    return 1 if results.get("errors") and not results.get("runs") else 0


if __name__ == "__main__":
    sys.exit(main())
