"""A client-only install (``pip install lookaside-grpc``, no server extra), as `python3 dev.py test-floor`
has: the `lookaside` CLI works and `lookaside-server` says in one line what to install. Where the server
extra is installed (the main venv), the installed programs run with its modules made unimportable."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from lookaside_dev.client_only import hide_modules_code

BIN = pathlib.Path(sys.executable).parent
_ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _without_server_extra(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A sitecustomize that hides the server extra from every program these tests start."""
    if not _ENV:
        site = tmp_path_factory.mktemp("client-only")
        (site / "sitecustomize.py").write_text(hide_modules_code())
        path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
        _ENV.update(os.environ, PYTHONPATH=path)


def run(*argv: str | pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=_ENV)


@pytest.mark.parametrize(
    "argv", [("lookaside-server",), ("-m", "lookaside_server")], ids=["script", "module"]
)
def test_lookaside_server_asks_for_the_server_extra(argv: tuple[str, ...]) -> None:
    program = (BIN / argv[0],) if len(argv) == 1 else (sys.executable, *argv)
    proc = run(*program, "--help")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "pip install 'lookaside-grpc[server]'" in proc.stderr


def test_lookaside_cli_runs_without_the_server() -> None:
    assert run(BIN / "lookaside", "--version").stdout.startswith("lookaside ")
    proc = run(sys.executable, "-m", "lookaside_grpc", "resolve", "greet.default", "--server", "127.0.0.1:1")
    assert proc.returncode == 6 and "cannot reach the lookaside server" in proc.stderr  # EXIT_UNAVAILABLE
    assert run(BIN / "lookaside", "resolve", "default/greet").returncode == 2  # one target grammar
