"""Child processes: each in its own process group, line-read stdout, CPU from /proc, stopped on any exit."""

from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    return env


class Proc:
    """A child process in its own session (process group), stdout read line by line in a thread."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, stdin: bool = False) -> None:
        self.name = name
        self.argv = argv
        self._log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            start_new_session=True,
            env=child_env(),
            cwd=str(REPO_ROOT),
        )
        self.pid = self.p.pid
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()
        MANAGER.add(self)

    def _read(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    def poll(self) -> int | None:
        return self.p.poll()

    def readline(self, timeout: float) -> str:
        """Next stdout line; TimeoutError after ``timeout`` s, EOFError if stdout closed (process ended)."""
        try:
            line = self._q.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no output within {timeout:.1f}s") from None
        if line is None:
            self._q.put(None)
            raise EOFError(f"{self.name}: exited with {self.p.poll()} (see its log)")
        return line

    def read_json(self, key: str, timeout: float) -> dict:
        """Skip lines until a JSON object line containing ``key``; bounded by ``timeout`` overall."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(deadline - time.monotonic())
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and key in obj:
                return obj

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write((line + "\n").encode())
        self.p.stdin.flush()

    def cpu_seconds(self) -> float:
        """utime+stime of the process so far (all its threads), from /proc/PID/stat; NaN if gone."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                data = f.read().decode()
        except OSError:
            return float("nan")
        fields = data[data.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def stop(self, timeout: float = 5.0) -> list[str]:
        """SIGTERM the process group, wait (bounded), then SIGKILL; return all stdout lines."""
        if self.p.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill()  # also reaps any leftover members of its group
        self._reader.join(timeout=2.0)
        if self.p.stdin is not None:
            try:
                self.p.stdin.close()
            except OSError:
                pass
        self._log.close()
        MANAGER.discard(self)
        return list(self.lines)

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass


class _Manager:
    """Every live child; all are stopped at exit, on exceptions (callers' finally) and on SIGTERM."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []
        self._lock = threading.Lock()

    def add(self, p: Proc) -> None:
        with self._lock:
            self._procs.append(p)

    def discard(self, p: Proc) -> None:
        with self._lock:
            if p in self._procs:
                self._procs.remove(p)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(reversed(self._procs))
        for p in procs:
            try:
                p.stop(timeout=3.0)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                p.kill()


MANAGER = _Manager()
atexit.register(MANAGER.stop_all)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so that finally blocks and atexit stop the children."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
