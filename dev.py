#!/usr/bin/env python3
"""Developer entry point that needs nothing but Python 3.11+: creates ./.venv on first use, then runs a task.

    python3 dev.py demo     # install, then run the local demo (lookaside server, Greet backends, a client)
    python3 dev.py test     # install (and, as root, Debian's chromium for the browser test), run the tests
    python3 dev.py proto    # regenerate the committed protobuf/gRPC code from proto/
    python3 dev.py bench [ARGS]  # run the benchmarks (e.g. `python3 dev.py bench --quick`)
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import venv

ROOT = pathlib.Path(__file__).resolve().parent
VENV = pathlib.Path(os.environ.get("LOOKASIDE_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".lookaside-installed"


def ensure_venv() -> None:
    """Create the venv and (re)install the project with its extras when pyproject.toml changed."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV} ...", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing lookaside-grpc[dev] (first run only) ...", file=sys.stderr)
    subprocess.run([PY, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([PY, "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(want)


def ensure_browser() -> None:
    """The status-page test drives Debian's chromium + chromedriver; install them when root has apt-get."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("warning: chromium/chromedriver missing; install Debian's chromium and chromium-driver "
              "for the browser test", file=sys.stderr)
        return
    print("installing Debian's chromium and chromium-driver (first run only) ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    packages = ["chromium", "chromium-driver"]
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "proto", "bench"}:
        print(__doc__, file=sys.stderr)
        return 2
    task, rest = argv[0], argv[1:]
    ensure_venv()
    if task == "test":
        ensure_browser()
    cmd = {
        "demo": [PY, "-m", "examples.demo", *rest],
        "test": [PY, "-m", "pytest", "-q", *rest],
        "proto": [PY, ROOT / "proto" / "generate.py", *rest],
        "bench": [PY, "-m", "benchmarks", "run", *rest],
    }[task]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
