#!/usr/bin/env python3
"""Developer entry point that needs nothing but Python 3.11+: creates ./.venv on first use, then runs a task.

python3 dev.py demo        # install, then run the local demo (lookaside server, Greet backends, a client)
python3 dev.py test        # install (and, as root, Debian's chromium for the browser test), run the tests
python3 dev.py test-floor  # the client tests on the oldest grpcio/protobuf pyproject.toml declares
python3 dev.py lint        # ruff check, ruff format --check, mypy --strict lookaside_grpc
python3 dev.py proto       # regenerate the committed protobuf/gRPC code from proto/ (pinned generator)
python3 dev.py bench [ARGS]  # run the benchmarks (e.g. `python3 dev.py bench --quick`)
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import venv

ROOT = pathlib.Path(__file__).resolve().parent
VENV = pathlib.Path(os.environ.get("LOOKASIDE_VENV", ROOT / ".venv"))
#: Holds only the pinned code generator (``GRPC_TOOLS`` in proto/generate.py).
PROTO_VENV = ROOT / ".venv-proto"
#: The client and its test tools, with grpcio and protobuf at the floors pyproject.toml declares.
FLOOR_VENV = ROOT / ".venv-floor"
BIN = "Scripts" if os.name == "nt" else "bin"
PY = VENV / BIN / "python"
STAMP = ".lookaside-installed"

#: The client's test files: `test-floor` runs them on the floor versions (without the server extra, so no
#: test here may import lookaside_server; files that do not exist yet are left out).
FLOOR_TESTS = [
    "tests/test_client_units.py",
    "tests/test_client_sync.py",
    "tests/test_client_aio.py",
    "tests/test_interceptor_sync.py",
    "tests/test_interceptor_aio.py",
    "tests/test_conformance.py",
    "tests/test_client_behaviour.py",
    "tests/test_client_only.py",
]
#: What `ruff format --check` covers: None = the whole tree (Python files; see [tool.ruff.format]).
FORMAT_CHECKED: list[str] | None = None


def _python(env: pathlib.Path) -> pathlib.Path:
    return env / BIN / "python"


def _ensure(
    env: pathlib.Path, what: str, want: str, install: list[list[str]], upgrade_pip: bool = True
) -> pathlib.Path:
    """Create ``env`` and run the ``pip install`` argument lists unless its stamp already says ``want``."""
    py, stamp = _python(env), env / STAMP
    if stamp.exists() and stamp.read_text() == want and py.exists():
        return py
    if not py.exists():
        print(f"creating {env} ...", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(env)
    print(f"installing {what} into {env.name} (first run only) ...", file=sys.stderr)
    if upgrade_pip:
        subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    for args in install:
        subprocess.run([py, "-m", "pip", "install", "-q", *args], check=True)
    stamp.write_text(want)
    return py


def _pyproject_hash(*extra: str) -> str:
    data = (ROOT / "pyproject.toml").read_bytes() + "\n".join(extra).encode()
    return hashlib.sha256(data).hexdigest()


def ensure_venv() -> None:
    """Create the venv and (re)install the project with its extras when pyproject.toml changed."""
    _ensure(VENV, "lookaside-grpc[dev]", _pyproject_hash(), [["-e", f"{ROOT}[dev]"]])


def _generator_pin() -> str:
    """``GRPC_TOOLS = "grpcio-tools==X"`` in proto/generate.py."""
    text = (ROOT / "proto" / "generate.py").read_text()
    m = re.search(r'^GRPC_TOOLS = "(grpcio-tools==[^"]+)"$', text, flags=re.M)
    if not m:
        raise SystemExit("proto/generate.py: no GRPC_TOOLS pin")
    return m[1]


def ensure_proto_venv() -> pathlib.Path:
    """``.venv-proto``: exactly the generator the committed code is made with."""
    pin = _generator_pin()
    return _ensure(PROTO_VENV, pin, pin, [[pin]], upgrade_pip=False)


def floors() -> list[str]:
    """``name==version`` for every ``name>=version`` among the client's dependencies in pyproject.toml."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", dep)
        if not m:
            raise SystemExit(f"pyproject.toml: dependency {dep!r} declares no floor (name>=version)")
        pins.append(f"{m[1]}=={m[2]}")
    return pins


def ensure_floor_venv() -> pathlib.Path:
    pins = floors()
    what = "lookaside-grpc[test] with " + " ".join(pins)
    return _ensure(
        FLOOR_VENV, what, _pyproject_hash(*pins), [["-e", f"{ROOT}[test]", *pins]], upgrade_pip=False
    )


def ensure_browser() -> None:
    """The status-page test drives Debian's chromium + chromedriver; install them when root has apt-get."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(
            "warning: chromium/chromedriver missing; install Debian's chromium and chromium-driver "
            "for the browser test",
            file=sys.stderr,
        )
        return
    print("installing Debian's chromium and chromium-driver (first run only) ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    packages = ["chromium", "chromium-driver"]
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, stdout=subprocess.DEVNULL
    )


def lint() -> int:
    """Every check runs (so one run shows all problems); the exit code is 1 if any failed."""
    checks = [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", *(FORMAT_CHECKED or ["."])],
        ["mypy", "--strict", "lookaside_grpc"],
    ]
    failed = []
    for check in checks:
        print("$", " ".join(check), file=sys.stderr, flush=True)
        if subprocess.run([VENV / BIN / check[0], *check[1:]], cwd=ROOT).returncode != 0:
            failed.append(check[0] + " " + check[1])
    if failed:
        print(f"lint failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    tasks = {"demo", "test", "test-floor", "lint", "proto", "bench"}
    if not argv or argv[0] not in tasks:
        print(__doc__, file=sys.stderr)
        return 2
    task, rest = argv[0], argv[1:]
    if task == "proto":
        return subprocess.run(
            [ensure_proto_venv(), ROOT / "proto" / "generate.py", *rest], cwd=ROOT
        ).returncode
    if task == "test-floor":
        floor_py = ensure_floor_venv()
        tests = [t for t in FLOOR_TESTS if (ROOT / t).exists()]
        print(f"client tests on {' '.join(floors())}", file=sys.stderr)
        cmd = [floor_py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, *rest]
        return subprocess.run(cmd, cwd=ROOT).returncode
    ensure_venv()
    if task == "lint":
        return lint()
    env = dict(os.environ)
    if task == "test":
        ensure_browser()
        env["LOOKASIDE_PROTO_PYTHON"] = str(ensure_proto_venv())  # tests/test_codegen.py generates with it
    cmd = {
        "demo": [PY, "-m", "examples.demo", *rest],
        "test": [PY, "-m", "pytest", "-q", *rest],
        "bench": [PY, "-m", "benchmarks", "run", *rest],
    }[task]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
