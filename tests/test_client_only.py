"""A client-only install (``pip install lookaside-grpc``, no server extra), as `python3 dev.py test-floor`
has: the `lookaside` CLI works and `lookaside-server` says in one line what to install. Skipped where the
server extra is installed (tests/test_cli.py covers the same by hiding the server's modules)."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("yaml") is not None and importlib.util.find_spec("kubernetes") is not None,
    reason="the server extra is installed here",
)
BIN = pathlib.Path(sys.executable).parent


def run(*argv: str | pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_lookaside_server_asks_for_the_server_extra() -> None:
    proc = run(BIN / "lookaside-server", "--help")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "pip install 'lookaside-grpc[server]'" in proc.stderr


def test_lookaside_cli_runs_without_the_server() -> None:
    assert run(BIN / "lookaside", "--version").stdout.startswith("lookaside ")
    proc = run(sys.executable, "-m", "lookaside_grpc", "resolve", "greet.default", "--server", "127.0.0.1:1")
    assert proc.returncode == 6 and "cannot reach the lookaside server" in proc.stderr  # EXIT_UNAVAILABLE
    assert run(BIN / "lookaside", "resolve", "default/greet").returncode == 2  # one target grammar
