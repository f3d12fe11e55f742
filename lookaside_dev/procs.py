"""Child processes for the demo and the benchmarks: start, wait for a line, stop, and never leak one.

Each child runs in its own session (process group): Ctrl-C in the terminal reaches only the parent, and
:meth:`Child.stop` ends the whole group (SIGTERM, bounded wait, then SIGKILL of anything left in it).
A reader thread collects stdout lines (stderr merged into it, or sent to a log file). :class:`Children`
owns a set of children and stops them all on exit, on errors and, with ``stop_at_exit=True``, at interpreter
exit. ``benchmarks/_procs.py`` builds on these and adds only what is benchmark-specific (CPU from /proc,
stdin commands, JSON lines).
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

#: The repository root: ``examples`` and ``lookaside_dev`` are imported from here, never installed.
REPO_ROOT = Path(__file__).resolve().parent.parent


class Child:
    """A child process whose stdout lines (stderr merged unless ``stderr`` is given) are collected.

    ``stderr``: a binary file to send stderr to (e.g. a log), else it is merged into the collected lines.
    ``stdin``: give the child a pipe (see :meth:`send`) instead of /dev/null.
    """

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        stderr: IO[bytes] | None = None,
        stdin: bool = False,
        cwd: str | None = None,
        base_env: dict[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if stderr is None else stderr,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=True,
            errors="replace",
            env={**(os.environ if base_env is None else base_env), "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
            start_new_session=True,  # its own process group: Ctrl-C in the terminal reaches only us
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"read-{self.pid}")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait_line(
        self, accept: Callable[[str], Any], timeout: float, start: int = 0, what: str = "the expected line"
    ) -> tuple[int, Any]:
        """Wait for the first line from index ``start`` for which ``accept(line)`` is truthy; return
        (its index, that value). TimeoutError after ``timeout`` s, EOFError when the child's output ended."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = start
            while True:
                for i in range(seen, len(self.lines)):
                    if result := accept(self.lines[i]):
                        return i, result
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    tail = "\n".join(self.lines[-20:])
                    raise EOFError(f"{self.args[1:4]} exited ({self.proc.returncode}) before {what}:\n{tail}")
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self.lines[-20:])
                    raise TimeoutError(f"{self.args[1:4]}: no {what} within {timeout:.1f}s:\n{tail}")
                self._cond.wait(left)

    def wait_for(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match[str]:
        """Wait until an output line (from index ``start``) matches ``pattern``; raise if it never does."""
        regex = re.compile(pattern)
        try:
            return self.wait_line(regex.search, timeout, start, f"line matching /{pattern}/")[1]
        except (TimeoutError, EOFError) as e:
            raise RuntimeError(str(e)) from None

    def send(self, line: str) -> None:
        """Write one line to the child's stdin (``stdin=True``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the process group, wait (bounded), then SIGKILL whatever is left of the group; return the
        exit code (negative: killed by that signal)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # the leader is gone or stuck: end it and any leftover member of its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(timeout)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        return self.proc.returncode


class Children:
    """Owns every child started or added through it and stops them all on exit, also on errors and Ctrl-C.

    ``stop_at_exit=True`` also stops the remaining ones at interpreter exit (atexit). Thread-safe.
    """

    def __init__(self, stop_at_exit: bool = False) -> None:
        self.children: list[Child] = []
        self._lock = threading.Lock()
        if stop_at_exit:
            atexit.register(self.stop_all)

    def start(self, *args: str, env: dict[str, str] | None = None) -> Child:
        """Start ``python ARGS`` with the repository root importable (``-m examples...`` works anywhere)."""
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return self.add(Child([sys.executable, *args], env={"PYTHONPATH": path, **(env or {})}))

    def add(self, child: Child) -> Child:
        with self._lock:
            self.children.append(child)
        return child

    def discard(self, child: Child) -> None:
        with self._lock:
            if child in self.children:
                self.children.remove(child)

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every child (newest first); best effort, never raises."""
        with self._lock:
            children = list(reversed(self.children))
        for child in children:
            try:
                child.stop(timeout)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
            self.discard(child)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def greet_backend(children: Children, delay: float = 0.0) -> tuple[Child, str]:
    """Start one Greet backend on a free loopback port; return it and its ``host:port``."""
    child = children.start("-m", "examples.greet.server", "--port", "0", "--delay", str(delay))
    address = child.wait_for(r'"listening": "([^"]+)"').group(1)
    return child, address


def lookaside_server(children: Children, static_file: str, poll_interval: float = 0.05) -> tuple[Child, str]:
    """Start the lookaside server on a free loopback port over ``static_file``; return it and its address."""
    child = children.start(
        "-m",
        "lookaside_server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--static-file",
        static_file,
        "--poll-interval",
        str(poll_interval),
        "--http-port",
        "0",
    )
    port = child.wait_for(r"listening on [\[\]0-9a-fA-F.:]*:(\d+)").group(1)
    return child, f"127.0.0.1:{port}"
