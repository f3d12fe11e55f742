"""The harness: starts lookaside server, backends and clients, runs the scenarios, collects raw figures."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks._modes import MODES
from benchmarks._procs import MANAGER, Proc, free_ports, python_module, wait_tcp

SERVICE, NAMESPACE = "greet", "default"
KEY = f"{NAMESPACE}/{SERVICE}"


@dataclass
class Settings:
    quick: bool = False
    calls: int = 20000
    time_limit: float = 15.0
    concurrency: int = 16
    backends: int = 3
    rounds: int = 3
    redial_every: int = 1000
    batch: int = 16
    modes: list[str] = field(default_factory=lambda: list(MODES))
    scenarios: list[str] = field(default_factory=lambda: ["steady", "single", "churn", "small", "slow"])
    single_rounds: int = 1
    churn_modes: list[str] | None = None
    churn_duration: float = 6.0
    churn_change_at: float = 2.0
    churn_grace: float = 1.5
    churn_concurrency: int = 4
    small_modes: list[str] | None = None
    small_clients: int = 100
    small_calls: int = 3
    small_parallel: int = 4
    slow_modes: list[str] | None = None
    slow_delay: float = 0.02
    slow_calls: int = 10000
    out: Path = Path(__file__).resolve().parent / "results"

    @classmethod
    def for_args(cls, quick: bool) -> Settings:
        if not quick:
            return cls()
        return cls(
            quick=True,
            calls=4000,
            time_limit=1.2,
            rounds=2,
            redial_every=500,
            churn_modes=["round_robin", "round_robin_redial", "lookaside_per_call", "lookaside_watch"],
            churn_duration=2.4,
            churn_change_at=0.8,
            churn_grace=0.8,
            small_modes=["round_robin", "lookaside_per_call", "lookaside_watch"],
            slow_modes=[
                "round_robin",
                "lookaside_per_call",
                "lookaside_watch",
                "lookaside_watch_least_request",
                "lookaside_watch_peak_ewma",
                "lookaside_watch_weighted",
            ],
            slow_calls=2000,
        )


def machine_info() -> dict[str, Any]:
    import grpc

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        info["protobuf"] = version("protobuf")
        info["lookaside_grpc"] = version("lookaside-grpc")
    except Exception:  # noqa: BLE001
        pass
    return info


class Harness:
    def __init__(self, s: Settings, progress: Any) -> None:
        self.s = s
        self.progress = progress
        self.tmp = Path(tempfile.mkdtemp(prefix="lookaside-bench-"))
        self.log_dir = s.out / "logs"
        shutil.rmtree(self.log_dir, ignore_errors=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.static_file = self.tmp / "endpoints.yaml"
        self.lookaside: Proc | None = None
        self.lookaside_addr: str | None = None
        self.skipped: dict[str, str] = {}
        self._seq = 0
        self._watch_channel: Any = None

    # ------------------------------------------------------------------------------------ lookaside
    def write_static(self, ports: list[int]) -> None:
        tmp = self.static_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({KEY: [{"ip": "127.0.0.1", "port": p} for p in ports]}))
        os.replace(tmp, self.static_file)

    def start_lookaside(self) -> None:
        from benchmarks._modes import lookaside_available

        sync, aio = lookaside_available()
        try:
            import importlib.util

            server_ok = importlib.util.find_spec("lookaside_server.__main__") is not None
        except (ImportError, ValueError):
            server_ok = False
        for name in self.s.modes:
            m = MODES[name]
            if m.needs_lookaside and not sync:
                self.skipped[name] = "lookaside_grpc.channel not available"
            elif m.needs_aio_lookaside and not aio:
                self.skipped[name] = "lookaside_grpc.aio.channel not available"
            elif (m.needs_lookaside or m.needs_aio_lookaside) and not server_ok:
                self.skipped[name] = "lookaside_server not available"
        if not any((MODES[n].needs_lookaside or MODES[n].needs_aio_lookaside) for n in self.active_modes()):
            return
        (port,) = free_ports(1)
        self.write_static([])
        self.lookaside = Proc(
            "lookaside_server",
            python_module(
                "lookaside_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--static-file",
                str(self.static_file),
                "--poll-interval",
                "0.05",
            ),
            self.log_dir,
        )
        if not wait_tcp(port, 20.0, self.lookaside):
            reason = f"lookaside server did not start (see {self.log_dir / 'lookaside_server.log'})"
            self.lookaside.stop()
            self.lookaside = None
            for n in self.active_modes():
                if MODES[n].needs_lookaside or MODES[n].needs_aio_lookaside:
                    self.skipped[n] = reason
            return
        self.lookaside_addr = f"127.0.0.1:{port}"

    def wait_lookaside_set(self, ports: list[int], timeout: float = 5.0) -> bool:
        """Until the lookaside server's Watch reports exactly ``ports`` (bounded)."""
        if self.lookaside_addr is None:
            return True
        import grpc

        from lookaside_grpc.protocol import LookasideStub, WatchRequest

        if self._watch_channel is None:
            self._watch_channel = grpc.insecure_channel(self.lookaside_addr)
        stub = LookasideStub(self._watch_channel)
        want = set(ports)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                stream = stub.Watch(WatchRequest(service=SERVICE, namespace=NAMESPACE), timeout=1.0)
                for es in stream:
                    if {e.port for e in es.endpoints} == want:
                        stream.cancel()
                        return True
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        return False

    def active_modes(self) -> list[str]:
        return [m for m in self.s.modes if m not in self.skipped]

    # ------------------------------------------------------------------------------------- backends
    def _name(self, what: str) -> str:
        self._seq += 1
        return f"{self._seq:03d}-{what}"

    def start_backends(
        self, ports: list[int], single: bool, delays: dict[int, float] | None = None
    ) -> list[Proc]:
        delays = delays or {}
        if single:
            groups: dict[float, list[int]] = {}
            for p in ports:
                groups.setdefault(delays.get(p, 0.0), []).append(p)
            procs = [
                Proc(
                    self._name("backends"),
                    python_module(
                        "benchmarks._multiserver", "--ports", ",".join(map(str, ps)), "--delay", str(d)
                    ),
                    self.log_dir,
                )
                for d, ps in groups.items()
            ]
        else:
            procs = [
                Proc(
                    self._name(f"greet-{p}"),
                    python_module(
                        "lookaside_examples.greet.server",
                        "--port",
                        str(p),
                        "--delay",
                        str(delays.get(p, 0.0)),
                    ),
                    self.log_dir,
                )
                for p in ports
            ]
        return procs

    @staticmethod
    def wait_backends(procs: list[Proc], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.read_json("listening", deadline - time.monotonic())

    @staticmethod
    def stop_backends(procs: list[Proc]) -> dict[str, dict[str, Any]]:
        """Stop; return {"127.0.0.1:PORT": {"calls", "connections"}} from their stats lines."""
        stats: dict[str, dict[str, Any]] = {}
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 15)
                except ProcessLookupError:
                    pass
        for p in procs:
            for line in p.stop(timeout=6.0):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and "connections" in obj:
                    stats[obj["name"]] = {"calls": obj["calls"], "connections": obj["connections"]}
        return stats

    # --------------------------------------------------------------------------------------- a run
    def run_one(
        self,
        scenario: str,
        mode: str,
        ports: list[int],
        *,
        single: bool = False,
        delays: dict[int, float] | None = None,
        calls: int | None = None,
        churn: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Fresh backends + one client subprocess for one mode; returns the raw record."""
        s = self.s
        all_ports = list(ports) + ([churn["new_port"]] if churn else [])
        if self.lookaside_addr:
            self.write_static(ports)
        name = self._name(f"{scenario}-{mode}")
        result_path = self.tmp / f"{name}.json"
        time_limit = churn["duration"] if churn else s.time_limit
        cfg: dict[str, Any] = {
            "scenario": "small" if scenario == "small" else "load",
            "mode": mode,
            "calls": calls or s.calls,
            "time_limit": time_limit,
            "concurrency": s.churn_concurrency if churn else s.concurrency,
            "keep_ts": bool(churn),
            "result_path": str(result_path),
            "clients": s.small_clients,
            "calls_per_client": s.small_calls,
            "parallel": s.small_parallel,
            "ctx": {
                "backends": [f"127.0.0.1:{p}" for p in ports],
                "lookaside": self.lookaside_addr,
                "service": SERVICE,
                "namespace": NAMESPACE,
                "static_file": str(self.static_file) if self.lookaside_addr or churn else None,
                "redial_every": s.redial_every,
                "batch": s.batch,
                "local_pool": scenario == "small",
            },
        }
        if scenario == "small":
            cfg["time_limit"] = 60.0
        if churn and not self.lookaside_addr:
            self.write_static(ports)
        cfg_path = self.tmp / f"{name}.cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        backends = self.start_backends(all_ports, single, delays)
        client = Proc(name, python_module("benchmarks._client", str(cfg_path)), self.log_dir, stdin=True)
        rec: dict[str, Any] = {"scenario": scenario, "mode": mode, "backends": len(ports), "single": single}
        removed_stats: dict[str, Any] = {}
        try:
            self.wait_backends(backends)
            if not self.wait_lookaside_set(ports):
                rec["warning"] = "lookaside server did not report the endpoint set in time"
            client.send("start")
            ready = client.read_json("ready", 30.0)
            rec["dial_s"] = ready.get("dial_s")
            cpu0 = sum(b.cpu_seconds() for b in backends)
            la0 = self.lookaside.cpu_seconds() if self.lookaside else None
            client.send("go")
            if churn:
                rec.update(self._churn_timeline(churn, ports, backends, single))
                removed_stats = rec.pop("_removed_stats", {})
            client.read_json("done", cfg["time_limit"] + 60.0)
            cpu1 = sum(b.cpu_seconds() for b in backends)
            la1 = self.lookaside.cpu_seconds() if self.lookaside else None
            client.p.wait(timeout=30.0)
            rec.update(json.loads(result_path.read_text()))
            rec["backend_cpu_s"] = cpu1 - cpu0 if not churn else None
            rec["lookaside_cpu_s"] = (la1 - la0) if la0 is not None and la1 is not None else None
        finally:
            client.stop(timeout=3.0)
            stats = self.stop_backends(backends)
        stats.update(removed_stats)
        rec["backend_stats"] = stats
        rec["connections"] = sum(v["connections"] for v in stats.values())
        return rec

    def _churn_timeline(
        self, churn: dict[str, Any], ports: list[int], backends: list[Proc], single: bool
    ) -> dict[str, Any]:
        """At change_at: swap removed->new in the static file; at +grace stop the removed backend."""
        t_go = time.monotonic()
        time.sleep(churn["change_at"])
        removed, new = churn["removed_port"], churn["new_port"]
        self.write_static([p for p in ports if p != removed] + [new])
        t_change = time.monotonic()
        time.sleep(churn["grace"])
        t_kill = time.monotonic()
        removed_stats: dict[str, Any] = {}
        if not single:
            victim = next(b for b in backends if b.name.endswith(f"greet-{removed}"))
            removed_stats = self.stop_backends([victim])
            backends.remove(victim)
        return {
            "t_go_harness": t_go,
            "t_change": t_change,
            "t_kill": t_kill,
            "removed": f"127.0.0.1:{removed}",
            "new": f"127.0.0.1:{new}",
            "_removed_stats": removed_stats,
        }

    def close(self) -> None:
        if self._watch_channel is not None:
            self._watch_channel.close()
        if self.lookaside is not None:
            self.lookaside.stop()
            self.lookaside = None
        MANAGER.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)


def plan(s: Settings, active: list[str]) -> list[tuple[str, int, list[str]]]:
    """(scenario, round, modes in order) for every group of runs; rounds rotate the mode order."""
    out = []
    if "steady" in s.scenarios:
        for r in range(s.rounds):
            k = r % len(active) if active else 0
            out.append(("steady", r, active[k:] + active[:k]))
    if "single" in s.scenarios:
        for r in range(s.single_rounds):
            k = (r + 1) % len(active) if active else 0
            out.append(("single", r, active[k:] + active[:k]))

    def pick(lst: list[str] | None, exclude: tuple[str, ...] = ()) -> list[str]:
        base = [m for m in active if m not in exclude] if lst is None else [m for m in lst if m in active]
        return base

    if "churn" in s.scenarios:
        out.append(("churn", 0, pick(s.churn_modes, ("direct",))))
    if "small" in s.scenarios:
        small = pick(s.small_modes, ("direct",))
        out.append(("small", 0, [m for m in small if MODES[m].kind == "sync" and m != "round_robin_redial"]))
    if "slow" in s.scenarios:
        out.append(("slow", 0, pick(s.slow_modes)))
    return [o for o in out if o[2]]


def run(s: Settings) -> dict[str, Any]:
    from tqdm import tqdm

    t_start = time.monotonic()
    s.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in s.__dict__.items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [],
        "errors": [],
    }
    bar = None
    h = Harness(s, None)
    try:
        h.start_lookaside()
        active = h.active_modes()
        results["modes"] = active
        results["skipped_modes"] = dict(h.skipped)
        groups = plan(s, active)
        total = sum(len(g[2]) for g in groups)
        bar = tqdm(total=total, desc="benchmark", unit="run", file=sys.stderr, dynamic_ncols=True)
        # the same ports for every run (fresh backend processes each time), so runs compare backend by backend
        ports = free_ports(s.backends + 1)
        base, extra = ports[: s.backends], ports[s.backends]
        for scenario, rnd, modes in groups:
            for mode in modes:
                bar.set_postfix_str(f"{scenario} r{rnd} {mode}")
                kw: dict[str, Any] = {}
                if scenario == "single":
                    kw["single"] = True
                elif scenario == "churn":
                    kw["churn"] = {
                        "new_port": extra,
                        "removed_port": base[0],
                        "duration": s.churn_duration,
                        "change_at": s.churn_change_at,
                        "grace": s.churn_grace,
                    }
                    kw["calls"] = 10**7
                elif scenario == "slow":
                    kw["delays"] = {base[-1]: s.slow_delay}
                    kw["calls"] = s.slow_calls
                try:
                    rec = h.run_one(scenario, mode, base, **kw)
                    rec["round"] = rnd
                    if scenario == "slow":
                        rec["slow_backend"] = f"127.0.0.1:{base[-1]}"
                    results["runs"].append(rec)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # noqa: BLE001 - record and go on with the next run
                    results["errors"].append(
                        {"scenario": scenario, "mode": mode, "round": rnd, "error": repr(e)}
                    )
                    tqdm.write(f"error in {scenario}/{mode}: {e!r}", file=sys.stderr)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        h.close()
    results["elapsed_s"] = time.monotonic() - t_start
    return results
