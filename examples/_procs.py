"""Child processes for the demo and the benchmarks: start, wait for a log line, stop, and never leak one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


class Child:
    """A child process whose merged stdout/stderr lines are collected by a reader thread."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # its own process group: Ctrl-C in the terminal reaches only us
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match[str]:
        """Wait until an output line (from index ``start``) matches ``pattern``; raise if it never does."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = start
            while True:
                for line in self.lines[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(self.lines[-20:])
                    raise RuntimeError(f"{self.args[2:]} did not print /{pattern}/ in {timeout}s:\n{tail}")
                self._cond.wait(left)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, then SIGKILL the whole process group if needed; return the exit code."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(timeout)
        return self.proc.returncode


class Children:
    """Owns every child started through it and stops them all on exit, also on errors and Ctrl-C."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> Child:
        child = Child([sys.executable, *args], env=env)
        self.children.append(child)
        return child

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for child in reversed(self.children):
            child.stop()


def greet_backend(children: Children, delay: float = 0.0) -> tuple[Child, str]:
    """Start one Greet backend on a free loopback port; return it and its ``host:port``."""
    child = children.start("-m", "lookaside_examples.greet.server", "--port", "0", "--delay", str(delay))
    address = child.wait_for(r'"listening": "([^"]+)"').group(1)
    return child, address


def lookaside_server(children: Children, static_file: str, poll_interval: float = 0.05) -> tuple[Child, str]:
    """Start the lookaside server on a free loopback port over ``static_file``; return it and its address."""
    child = children.start(
        "-m", "lookaside_server", "--host", "127.0.0.1", "--port", "0",
        "--static-file", static_file, "--poll-interval", str(poll_interval), "--http-port", "0",
    )
    port = child.wait_for(r"listening on [\[\]0-9a-fA-F.:]*:(\d+)").group(1)
    return child, f"127.0.0.1:{port}"
