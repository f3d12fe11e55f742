"""``--version`` on every command: the installed lookaside-grpc version, exit 0."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = metadata.version("lookaside-grpc")


@pytest.mark.parametrize(
    "module",
    [
        "lookaside_server",
        "lookaside_grpc",
        "examples.gateway",
        "examples.greet.server",
        "examples.greet.client",
        "examples.demo",
        "benchmarks",
    ],
)
def test_version(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith((VERSION, f"{VERSION})")), proc.stdout
