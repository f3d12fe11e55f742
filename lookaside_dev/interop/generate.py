"""Regenerate the interop test service's Python code next to its .proto files.

From the repository root, with the OLDEST generator the project supports (``.venv-proto``, made by
``python3 dev.py proto``; gencode from newer tools refuses to import on older protobuf runtimes)::

    .venv-proto/bin/python -m lookaside_dev.interop.generate

The protos are compiled with the repository root as the include path, so their file names are
``lookaside_dev/interop/v1/*.proto`` (unique in any descriptor pool) and the generated imports are absolute
(``from lookaside_dev.interop.v1 import messages_pb2``) with no rewriting. The output is byte-identical to
``proto/generate.py`` given the group ``Group(".", ("lookaside_dev/interop/v1/empty.proto",
"lookaside_dev/interop/v1/messages.proto", "lookaside_dev/interop/v1/test.proto"))``.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTOS = ("empty.proto", "messages.proto", "test.proto")
V1 = pathlib.Path("lookaside_dev/interop/v1")


def generate(out_root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """Generate ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_root``; return the files."""
    from grpc_tools import protoc  # dev dependency

    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(V1 / name) for name in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed for the interop protos")
    return sorted((out_root / V1).glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT), file=sys.stderr)
