"""Benchmark child processes: :class:`lookaside_dev.procs.Child` (own process group, stdout lines
read by a thread, group stopped on any exit) plus what only the benchmark needs: stderr to a log file, a
stdin pipe, JSON-line reads, CPU from /proc, and one process-wide owner stopping every child at exit and
on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from lookaside_dev.procs import REPO_ROOT, Child, Children

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together while picking, so they differ)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(int(s.getsockname()[1]))
    finally:
        for s in socks:
            s.close()
    return ports


def wait_tcp(port: int, timeout: float, proc: Proc | None = None) -> bool:
    """Wait until 127.0.0.1:port accepts connections (False on timeout or if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    env.pop("GRPC_XDS_BOOTSTRAP", None)  # xds modes get GRPC_XDS_BOOTSTRAP_CONFIG; a file would win
    return env


#: Every live benchmark child; all are stopped at exit, on exceptions (callers' finally) and on SIGTERM.
MANAGER = Children(stop_at_exit=True)


class Proc(Child):
    """A benchmark child: stderr to ``log_dir/NAME.log``, optional stdin pipe, registered with MANAGER."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: Path,
        stdin: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self._log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        try:
            super().__init__(
                argv, env, stderr=self._log, stdin=stdin, cwd=str(REPO_ROOT), base_env=child_env()
            )
        except BaseException:
            self._log.close()
            raise
        self._cursor = 0  # next line for read_json
        MANAGER.add(self)

    def read_json(self, key: str, timeout: float) -> dict:
        """The next JSON object line (after those already read) containing ``key``; skips other lines.
        TimeoutError after ``timeout`` s, EOFError if the process ended first."""

        def accept(line: str) -> dict | None:
            try:
                obj = json.loads(line)
            except ValueError:
                return None
            return obj if isinstance(obj, dict) and key in obj else None

        i, obj = self.wait_line(accept, timeout, self._cursor, f"JSON line with {key!r}")
        self._cursor = i + 1
        return obj

    def cpu_seconds(self) -> float:
        """utime+stime of the process so far (all its threads), from /proc/PID/stat; NaN if gone."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                data = f.read().decode()
        except OSError:
            return float("nan")
        fields = data[data.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def stop(self, timeout: float = 5.0) -> list[str]:  # type: ignore[override]
        """Stop the process group (see Child.stop); return all stdout lines."""
        try:
            super().stop(timeout)
        finally:
            self._log.close()
            MANAGER.discard(self)
        return list(self.lines)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so that finally blocks and atexit stop the children."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
