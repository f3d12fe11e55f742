"""Regenerate the committed protobuf/gRPC Python code from the .proto files in this folder.

Run from anywhere: ``python proto/generate.py`` (or ``make proto``). ``tests/test_codegen.py`` runs the same
generation into a temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"

# proto file -> package folder (relative to the repo root) that holds its generated code.
TARGETS: dict[str, str] = {
    "lookaside.proto": "lookaside_grpc/_generated",
    "greet.proto": "examples/greet",
}


def _fix_imports(text: str) -> str:
    """protoc writes ``import x_pb2``; inside a package it must be a relative import."""
    return re.sub(r"^import (\w+_pb2) as (\w+)$", r"from . import \1 as \2", text, flags=re.M)


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Generate every target under ``out_root`` (mirroring the repo layout); return the files written."""
    from grpc_tools import protoc  # dev dependency, imported lazily

    written: list[pathlib.Path] = []
    for proto, package in TARGETS.items():
        with tempfile.TemporaryDirectory() as tmp:
            args = [
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO_DIR / proto),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed for {proto}")
            dest = out_root / package
            dest.mkdir(parents=True, exist_ok=True)
            for produced in sorted(pathlib.Path(tmp).iterdir()):
                target = dest / produced.name
                target.write_text(_fix_imports(produced.read_text()))
                written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(ROOT):
        print(path.relative_to(ROOT), file=sys.stderr)
