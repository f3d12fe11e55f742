"""The wheel carries every package of the source tree (an editable install would hide a missing one)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def source_packages() -> set[str]:
    """Dotted names of every package under lookaside_grpc/ and server/lookaside_server/."""
    found = set()
    for top, base in (
        ("lookaside_grpc", ROOT / "lookaside_grpc"),
        ("lookaside_server", ROOT / "server" / "lookaside_server"),
    ):
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join((top, *rel.parts)))
    return found


def test_wheel_contains_every_package(tmp_path: pathlib.Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("lookaside_grpc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert source_packages() <= in_wheel, sorted(source_packages() - in_wheel)
    assert not any(n.startswith(("examples/", "lookaside_dev/", "tests/", "benchmarks/")) for n in names)
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "lookaside_grpc/py.typed" in names and "lookaside_server/py.typed" in names
