"""The harness: starts lookaside server, backends and clients, runs the scenarios, collects raw figures."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks._modes import MODES
from benchmarks._procs import MANAGER, Proc, free_ports, python_module, wait_tcp

SERVICE, NAMESPACE = "greet", "default"
KEY = f"{NAMESPACE}/{SERVICE}"
POLL_INTERVAL = 0.02  # the lookaside server's static-file poll: bounds how late it sees a change
SCENARIOS = ["steady", "single", "churn", "churn_k8s", "small", "slow"]


def xds_bootstrap(lookaside: str) -> str:
    """GRPC_XDS_BOOTSTRAP_CONFIG for a stock grpc client using the lookaside (ADS on its gRPC port)."""
    return json.dumps(
        {
            "xds_servers": [
                {
                    "server_uri": lookaside,
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }
            ],
            "node": {"id": "bench-client", "cluster": "bench"},
        }
    )


def lookaside_argv(port: int, *source: str) -> list[str]:
    """The lookaside server on 127.0.0.1:port, status page off (it would try port 8080)."""
    return python_module(
        "lookaside_server", "--host", "127.0.0.1", "--port", str(port), "--http-port", "-1", *source
    )


@dataclass
class Settings:
    quick: bool = False
    calls: int = 20000
    time_limit: float = 15.0
    concurrency: int = 16
    backends: int = 3
    rounds: int = 5  # steady-state rounds: every figure is a median over them with its min-max
    redial_every: int = 1000
    batch: int = 16
    modes: list[str] = field(default_factory=lambda: list(MODES))
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    steady_modes: list[str] | None = None  # None: every active mode
    single_rounds: int = 1
    single_modes: list[str] | None = None
    churn_modes: list[str] | None = None
    churn_k8s_modes: list[str] | None = None
    churn_rounds: int = 5  # churn (and churn_k8s) rounds, rotating mode order
    churn_duration: float = 5.0
    churn_change_at: float = 1.5
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
            calls=3000,
            time_limit=1.0,
            rounds=2,
            redial_every=500,
            steady_modes=[m for m in MODES if m != "direct" and not m.startswith("lookaside_watch_")],
            single_modes=["round_robin", "lookaside_watch", "interceptor_watch", "xds", "aio_round_robin"],
            churn_modes=[
                "round_robin",
                "round_robin_redial",
                "lookaside_per_call",
                "lookaside_watch",
                "interceptor_watch",
                "xds",
            ],
            churn_k8s_modes=["lookaside_watch", "interceptor_watch", "xds"],
            churn_rounds=1,
            churn_duration=1.5,
            churn_change_at=0.5,
            churn_grace=0.5,
            small_clients=60,
            small_modes=["round_robin", "lookaside_per_call", "lookaside_watch", "interceptor_watch", "xds"],
            slow_modes=[
                "round_robin",
                "lookaside_per_call",
                "lookaside_watch",
                "interceptor_watch",
                "xds",
                "lookaside_watch_least_request",
                "lookaside_watch_peak_ewma",
                "lookaside_watch_weighted",
            ],
            slow_calls=1500,
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
        # churn_k8s: an in-process Kubernetes API server (lookaside_dev.kube_api) and a second lookaside
        # server reading EndpointSlices from it
        self.kube: Any = None
        self.kube_lookaside: Proc | None = None
        self.kube_addr: str | None = None
        self.skipped: dict[str, str] = {}
        self._seq = 0
        self._watch_channels: dict[str, Any] = {}

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
        if not any(_needs_lookaside(n) for n in self.active_modes()):
            return
        (port,) = free_ports(1)
        self.write_static([])
        self.lookaside = Proc(
            "lookaside_server",
            lookaside_argv(
                port, "--static-file", str(self.static_file), "--poll-interval", str(POLL_INTERVAL)
            ),
            self.log_dir,
        )
        if not wait_tcp(port, 20.0, self.lookaside):
            reason = f"lookaside server did not start (see {self.log_dir / 'lookaside_server.log'})"
            self.lookaside.stop()
            self.lookaside = None
            for n in self.active_modes():
                if _needs_lookaside(n):
                    self.skipped[n] = reason
            return
        self.lookaside_addr = f"127.0.0.1:{port}"

    def start_kube(self) -> None:
        """The Kubernetes API test server (in this process) and a lookaside server reading it."""
        from lookaside_dev.kube_api import KubeAPIServer, service

        self.kube = KubeAPIServer(bookmark_interval=5.0).start()
        self.kube.apply(service(SERVICE, NAMESPACE, ports=[("grpc", 50051)]))
        kubeconfig = self.tmp / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "bench",
                    "clusters": [{"name": "bench", "cluster": {"server": self.kube.url}}],
                    "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
                    "users": [{"name": "bench", "user": {}}],
                }
            )
        )
        (port,) = free_ports(1)
        self.kube_lookaside = Proc(
            "lookaside_server_k8s",
            lookaside_argv(
                port,
                "--source",
                "endpointslices",
                "--kubeconfig",
                str(kubeconfig),
                # the allow-list of Kubernetes sources defaults to the server's own namespace
                # (POD_NAMESPACE, else the kubeconfig context's): name it
                "--allow-namespace",
                NAMESPACE,
            ),
            self.log_dir,
        )
        if not wait_tcp(port, 20.0, self.kube_lookaside):
            raise RuntimeError(
                f"lookaside server (k8s) did not start (see {self.log_dir}/lookaside_server_k8s.log)"
            )
        self.kube_addr = f"127.0.0.1:{port}"

    def kube_slice(self, port: int, ready: bool = True) -> dict[str, Any]:
        """One EndpointSlice per backend (each backend has its own port); not ready = terminating pod."""
        from lookaside_dev.kube_api import endpoint, endpoint_slice

        ep = (
            endpoint("127.0.0.1")
            if ready
            else endpoint("127.0.0.1", ready=False, serving=True, terminating=True)
        )
        return endpoint_slice(f"{SERVICE}-{port}", SERVICE, NAMESPACE, endpoints=[ep], ports=[("grpc", port)])

    def kube_set(self, ports: list[int]) -> None:
        want = {f"{SERVICE}-{p}" for p in ports}
        for obj in self.kube.list("EndpointSlice", NAMESPACE):
            if obj["metadata"]["name"] not in want:
                self.kube.delete("EndpointSlice", NAMESPACE, obj["metadata"]["name"])
        for p in ports:
            self.kube.apply(self.kube_slice(p))

    def _watch_stub(self, addr: str) -> Any:
        import grpc

        from lookaside_grpc.protocol import LookasideStub

        if addr not in self._watch_channels:
            self._watch_channels[addr] = grpc.insecure_channel(addr)
        return LookasideStub(self._watch_channels[addr])

    def wait_lookaside_set(self, addr: str | None, ports: list[int], timeout: float = 5.0) -> bool:
        """Until the lookaside server's Watch reports exactly ``ports`` (bounded)."""
        if addr is None:
            return True
        import grpc

        from lookaside_grpc.protocol import WatchRequest

        stub = self._watch_stub(addr)
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

    def seen_probe(self, addr: str, port: int, timeout: float) -> tuple[threading.Thread, dict[str, float]]:
        """Watch the lookaside (subscribed before the change) and note when ``port`` first appears in its set:
        splits a churn delay into "the lookaside saw it" and "the client followed"."""
        import grpc

        from lookaside_grpc.protocol import WatchRequest

        stream = self._watch_stub(addr).Watch(
            WatchRequest(service=SERVICE, namespace=NAMESPACE), timeout=timeout
        )
        next(stream)  # the current set: subscribed
        out: dict[str, float] = {}

        def run() -> None:
            try:
                for es in stream:
                    if any(e.port == port for e in es.endpoints):
                        out["t"] = time.monotonic()
                        break
            except grpc.RpcError:
                pass
            finally:
                stream.cancel()

        t = threading.Thread(target=run, name="seen-probe", daemon=True)
        t.start()
        return t, out

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
                        "examples.greet.server",
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
        k8s: bool = False,
    ) -> dict[str, Any]:
        """Fresh backends + one client subprocess for one mode; returns the raw record."""
        s = self.s
        all_ports = list(ports) + ([churn["new_port"]] if churn else [])
        addr = self.kube_addr if k8s else self.lookaside_addr
        la_proc = self.kube_lookaside if k8s else self.lookaside
        if k8s:
            self.kube_set(ports)
        elif self.lookaside_addr or churn:
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
                "lookaside": addr,
                "service": SERVICE,
                "namespace": NAMESPACE,
                "static_file": str(self.static_file) if not k8s and (self.lookaside_addr or churn) else None,
                "redial_every": s.redial_every,
                "batch": s.batch,
                "local_pool": scenario == "small",
            },
        }
        if scenario == "small":
            cfg["time_limit"] = 60.0
        cfg_path = self.tmp / f"{name}.cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        env = {"GRPC_XDS_BOOTSTRAP_CONFIG": xds_bootstrap(addr)} if MODES[mode].xds and addr else None
        backends = self.start_backends(all_ports, single, delays)
        client = Proc(
            name, python_module("benchmarks._client", str(cfg_path)), self.log_dir, stdin=True, env=env
        )
        rec: dict[str, Any] = {"scenario": scenario, "mode": mode, "backends": len(ports), "single": single}
        removed_stats: dict[str, Any] = {}
        try:
            self.wait_backends(backends)
            if not self.wait_lookaside_set(addr, ports):
                rec["warning"] = "lookaside server did not report the endpoint set in time"
            client.send("start")
            ready = client.read_json("ready", 30.0)
            rec["dial_s"] = ready.get("dial_s")
            cpu0 = sum(b.cpu_seconds() for b in backends)
            la0 = la_proc.cpu_seconds() if la_proc else None
            client.send("go")
            if churn:
                rec.update(self._churn_timeline(churn, ports, backends, single, k8s, addr))
                removed_stats = rec.pop("_removed_stats", {})
            client.read_json("done", cfg["time_limit"] + 60.0)
            cpu1 = sum(b.cpu_seconds() for b in backends)
            la1 = la_proc.cpu_seconds() if la_proc else None
            client.proc.wait(timeout=30.0)
            rec.update(json.loads(result_path.read_text()))
            rec["backend_cpu_s"] = cpu1 - cpu0 if not churn else None
            rec["lookaside_cpu_s"] = (la1 - la0) if la0 is not None and la1 is not None else None
        finally:
            client.stop(timeout=3.0)
            stats = self.stop_backends(backends)
        stats.update(removed_stats)
        if len(stats) < len(all_ports):
            rec["warning"] = (rec.get("warning", "") + " some backends printed no stats (killed?)").strip()
        rec["backend_stats"] = stats
        rec["connections"] = sum(v["connections"] for v in stats.values())
        return rec

    def _churn_timeline(
        self,
        churn: dict[str, Any],
        ports: list[int],
        backends: list[Proc],
        single: bool,
        k8s: bool,
        addr: str | None,
    ) -> dict[str, Any]:
        """At change_at: swap removed->new (static file, or EndpointSlices: the new one ready, the removed one
        terminating); at +grace stop the removed backend (and delete its slice)."""
        t_go = time.monotonic()
        removed, new = churn["removed_port"], churn["new_port"]
        probe = None
        if addr:
            try:
                probe = self.seen_probe(addr, new, churn["duration"] + 10.0)
            except Exception:  # noqa: BLE001 - the probe is extra information only
                probe = None
        time.sleep(max(0.0, t_go + churn["change_at"] - time.monotonic()))
        if k8s:
            self.kube.apply(self.kube_slice(new))
            t_change = time.monotonic()
            self.kube.apply(self.kube_slice(removed, ready=False))
        else:
            self.write_static([p for p in ports if p != removed] + [new])
            t_change = time.monotonic()
        time.sleep(churn["grace"])
        t_kill = time.monotonic()
        removed_stats: dict[str, Any] = {}
        if not single:
            victim = next(b for b in backends if b.name.endswith(f"greet-{removed}"))
            removed_stats = self.stop_backends([victim])
            backends.remove(victim)
        if k8s:
            self.kube.delete("EndpointSlice", NAMESPACE, f"{SERVICE}-{removed}")
        t_seen = None
        if probe is not None:
            probe[0].join(timeout=1.0)
            t_seen = probe[1].get("t")
        return {
            "t_go_harness": t_go,
            "t_change": t_change,
            "t_lookaside_seen": t_seen,
            "t_kill": t_kill,
            "removed": f"127.0.0.1:{removed}",
            "new": f"127.0.0.1:{new}",
            "source": "kubernetes" if k8s else "static",
            "_removed_stats": removed_stats,
        }

    def close(self) -> None:
        for ch in self._watch_channels.values():
            ch.close()
        self._watch_channels.clear()
        for attr in ("kube_lookaside", "lookaside"):
            proc = getattr(self, attr)
            if proc is not None:
                proc.stop()
                setattr(self, attr, None)
        if self.kube is not None:
            self.kube.stop()
            self.kube = None
        MANAGER.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _needs_lookaside(name: str) -> bool:
    m = MODES[name]
    return m.needs_lookaside or m.needs_aio_lookaside


def plan(s: Settings, active: list[str]) -> list[tuple[str, int, list[str]]]:
    """(scenario, round, modes in order) for every group of runs; rounds rotate the mode order."""
    out = []

    def pick(lst: list[str] | None, exclude: tuple[str, ...] = ()) -> list[str]:
        base = [m for m in active if m not in exclude] if lst is None else [m for m in lst if m in active]
        return base

    if "steady" in s.scenarios:
        steady = pick(s.steady_modes)
        for r in range(s.rounds):
            k = r % len(steady) if steady else 0
            out.append(("steady", r, steady[k:] + steady[:k]))
    if "single" in s.scenarios:
        single = pick(s.single_modes)
        for r in range(s.single_rounds):
            k = (r + 1) % len(single) if single else 0
            out.append(("single", r, single[k:] + single[:k]))

    def rotate(lst: list[str], r: int) -> list[str]:
        k = r % len(lst) if lst else 0
        return lst[k:] + lst[:k]

    if "churn" in s.scenarios:
        churn = pick(s.churn_modes, ("direct",))
        for r in range(s.churn_rounds):
            out.append(("churn", r, rotate(churn, r)))
    if "churn_k8s" in s.scenarios:
        policies = tuple(m for m in MODES if m.startswith("lookaside_watch_"))
        k8s = [m for m in pick(s.churn_k8s_modes, policies) if _needs_lookaside(m)]
        for r in range(s.churn_rounds):
            out.append(("churn_k8s", r, rotate(k8s, r)))
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
        "format": 2,  # 2: figures per round with median and min-max in the summary ("rounds")
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
            if scenario == "churn_k8s" and h.kube_addr is None:
                try:
                    h.start_kube()
                except Exception as e:  # noqa: BLE001 - record and skip the scenario
                    for mode in modes:
                        results["errors"].append(
                            {"scenario": scenario, "mode": mode, "round": rnd, "error": repr(e)}
                        )
                    tqdm.write(f"churn_k8s skipped: {e!r}", file=sys.stderr)
                    bar.update(len(modes))
                    continue
            for mode in modes:
                bar.set_postfix_str(f"{scenario} r{rnd} {mode}")
                kw: dict[str, Any] = {}
                if scenario == "single":
                    kw["single"] = True
                elif scenario in ("churn", "churn_k8s"):
                    kw["churn"] = {
                        "new_port": extra,
                        "removed_port": base[0],
                        "duration": s.churn_duration,
                        "change_at": s.churn_change_at,
                        "grace": s.churn_grace,
                    }
                    kw["calls"] = 10**7
                    kw["k8s"] = scenario == "churn_k8s"
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
