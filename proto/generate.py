"""Regenerate the committed protobuf/gRPC Python code from the .proto files.

Run ``python3 dev.py proto``: it runs this script in ``.venv-proto``, a small venv holding exactly the
generator pinned below (:data:`GRPC_TOOLS`), the OLDEST one the project supports. protobuf gencode made by
newer tools refuses to import on older runtimes (it embeds a runtime version check since protobuf 5.x), while
old gencode imports on new runtimes; so the committed code is generated with the oldest tools and works on
every protobuf from the declared floor up. ``tests/test_codegen.py`` runs the same generation into a
temporary folder and fails when the committed files differ.

``python proto/generate.py [OUT_ROOT]`` writes under ``OUT_ROOT`` (default: the repository root), mirroring
the repository layout.

File names stay unique in any descriptor pool: each .proto is compiled under its package path
(``lookaside/v1/lookaside.proto``), never as a bare ``lookaside.proto``. The wire names (package
``lookaside``, the service, every field number) are those of the original design.

The lookaside protocol's messages are registered in a descriptor pool private to ``lookaside_grpc`` (see
:data:`PRIVATE_POOL`), not the process-wide default pool: an application that already holds stubs generated
from the original ``lookaside.proto`` defines the same symbols (``lookaside.Request``, ...) in the default
pool, and protobuf refuses a second definition of a symbol ("duplicate symbol") whatever the file name. The
messages serialize identically; only lookups by name through ``descriptor_pool.Default()`` do not see them.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: The generator the committed code is made with (``dev.py proto`` installs exactly this into .venv-proto).
#: grpcio-tools 1.60 bundles protoc 25 (protobuf 4.25 gencode): the floors declared in pyproject.toml.
GRPC_TOOLS = "grpcio-tools==1.60.0"


@dataclasses.dataclass(frozen=True)
class Group:
    """One protoc run: ``protos`` (paths relative to ``include``) compiled with ``-I include``.

    ``out`` is the folder (relative to the repository root) that receives the generated modules, flattened
    there with package-relative imports (``from . import x_pb2``); ``None`` keeps protoc's own layout under
    the repository root (use with ``include="."`` so the import paths are the real module paths).
    ``private_pool`` registers the files in a descriptor pool of their own instead of the default pool.
    """

    include: str
    protos: tuple[str, ...]
    out: str | None = None
    private_pool: bool = False


_CLIENT_GENERATED = "lookaside_grpc/_generated"

#: Every generated file of the repository. Add a Group per proto root.
GROUPS: tuple[Group, ...] = (
    Group("proto", ("lookaside/v1/lookaside.proto",), out="lookaside_grpc/_generated", private_pool=True),
    # ORCA load reports (cncf/xds) for lookaside_grpc.orca: private too (the server's xds-protos define them).
    Group("proto", ("xds/data/orca/v3/orca_load_report.proto",), out=_CLIENT_GENERATED, private_pool=True),
    Group("proto", ("greet/v1/greet.proto",), out="examples/greet"),
    # The interop test service (gRPC's interop test.proto layout), named by its real module path.
    Group(".", tuple(f"lookaside_dev/interop/v1/{name}.proto" for name in ("empty", "messages", "test"))),
)

#: Replaces ``_descriptor_pool.Default()`` in the private-pool modules (see the module docstring).
PRIVATE_POOL = (
    "# lookaside_grpc keeps these messages in a descriptor pool of its own, so that an application may also\n"
    "# hold the same symbols (the original lookaside.proto, xds-protos' ORCA) in the default pool.\n"
    "# Written by proto/generate.py.\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
)


def _module_name(out: str, produced: pathlib.Path) -> str:
    return ".".join([*pathlib.PurePosixPath(out).parts, produced.stem])


def _rewrite(text: str, group: Group, produced: pathlib.Path, rel: pathlib.PurePosixPath) -> str:
    if group.out is None:
        return text
    # protoc names modules after the .proto path (``from greet.v1 import greet_pb2``); the modules live
    # flattened in ``out``: import siblings relatively and name the classes' module by its real path.
    text = re.sub(r"^from [\w.]+ import (\w+_pb2) as (\w+)$", r"from . import \1 as \2", text, flags=re.M)
    text = re.sub(r"^import (\w+_pb2) as (\w+)$", r"from . import \1 as \2", text, flags=re.M)
    proto_module = ".".join([*rel.parent.parts, produced.stem])
    text = text.replace(
        f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{proto_module}', _globals)",
        f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{_module_name(group.out, produced)}', _globals)",
    )
    if group.private_pool and produced.name.endswith("_pb2.py"):
        default = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
        if default not in text:
            raise RuntimeError(f"{produced.name}: unexpected protoc output, cannot use a private pool")
        private = default.replace("_descriptor_pool.Default()", "POOL")
        text = text.replace(default, PRIVATE_POOL + "\n" + private)
    if group.private_pool and produced.name.endswith("_pb2.pyi"):
        anchor = "DESCRIPTOR: _descriptor.FileDescriptor\n"
        if anchor not in text:
            raise RuntimeError(f"{produced.name}: unexpected protoc output, cannot declare the private pool")
        pool = "from google.protobuf import descriptor_pool as _descriptor_pool\n\n"
        text = text.replace(anchor, anchor + pool + "POOL: _descriptor_pool.DescriptorPool\n")
    return text


def _grpc_stub(fds_bytes: bytes, proto: str, module: str) -> str | None:
    """A typed ``*_pb2_grpc.pyi`` for ``proto``'s services (protoc writes none): stubs, servicers, adders."""
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString(fds_bytes)
    (file,) = [f for f in fds.file if f.name == proto]
    if not file.service:
        return None
    own = f".{file.package}." if file.package else "."
    local = {own + m.name for m in file.message_type}
    if any(t not in local for s in file.service for m in s.method for t in (m.input_type, m.output_type)):
        return None  # messages from other files: not supported here (the .py stays untyped)

    def py(type_name: str) -> str:
        return f"{module}.{type_name[len(own) :]}"

    kinds = {
        (False, False): "UnaryUnary",
        (False, True): "UnaryStream",
        (True, False): "StreamUnary",
        (True, True): "StreamStream",
    }
    lines = [
        f'"""Types of {module}_grpc.py, written by proto/generate.py (protoc writes none)."""',
        "",
        "from collections.abc import AsyncIterator, Awaitable, Iterator",
        "from typing import Any, overload",
        "",
        "import grpc",
        "import grpc.aio",
        "",
        f"from . import {module}",
        "",
        "_Context = grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any]",
        "",
    ]
    for service in file.service:
        name = service.name
        lines += ["", f"class {name}Stub:"]
        lines += [
            "    @overload",
            f"    def __new__(cls, channel: grpc.Channel) -> {name}Stub: ...",
            "    @overload",
            f"    def __new__(cls, channel: grpc.aio.Channel) -> {name}AsyncStub: ...",
        ]
        for m in service.method:
            kind = kinds[(m.client_streaming, m.server_streaming)]
            lines.append(f"    {m.name}: grpc.{kind}MultiCallable[{py(m.input_type)}, {py(m.output_type)}]")
        lines += [
            "",
            f"class {name}AsyncStub:",
            "    def __init__(self, channel: grpc.aio.Channel) -> None: ...",
        ]
        for m in service.method:
            kind = kinds[(m.client_streaming, m.server_streaming)]
            lines.append(
                f"    {m.name}: grpc.aio.{kind}MultiCallable[{py(m.input_type)}, {py(m.output_type)}]"
            )
        lines += ["", f"class {name}Servicer:"]
        for m in service.method:
            req, resp = py(m.input_type), py(m.output_type)
            request = f"Iterator[{req}] | AsyncIterator[{req}]" if m.client_streaming else req
            result = (
                f"Iterator[{resp}] | AsyncIterator[{resp}]"
                if m.server_streaming
                else f"{resp} | Awaitable[{resp}]"
            )
            lines += [
                f"    def {m.name}(",
                f"        self, request: {request}, context: _Context",
                f"    ) -> {result}: ...",
            ]
        lines += [
            "",
            f"def add_{name}Servicer_to_server(",
            f"    servicer: {name}Servicer, server: grpc.Server | grpc.aio.Server",
            ") -> None: ...",
        ]
    return "\n".join(lines) + "\n"


def generate(out_root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """Generate every group under ``out_root`` (mirroring the repository layout); return the files written."""
    from grpc_tools import protoc  # the pinned generator, imported lazily

    written: list[pathlib.Path] = []
    for group in GROUPS:
        include = ROOT / group.include
        with tempfile.TemporaryDirectory() as tmp:
            args = [
                "grpc_tools.protoc",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"--descriptor_set_out={tmp}/descriptors.pb",
                "--include_imports",
                *(str(include / p) for p in group.protos),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed for {group.protos}")
            fds = (pathlib.Path(tmp) / "descriptors.pb").read_bytes()
            for proto in group.protos:
                module = pathlib.PurePosixPath(proto).stem + "_pb2"
                stub = _grpc_stub(fds, proto, module)
                if stub is not None:
                    folder = pathlib.Path(tmp) / pathlib.PurePosixPath(proto).parent
                    (folder / f"{module}_grpc.pyi").write_text(stub)
            for produced in sorted(pathlib.Path(tmp).rglob("*.py*")):
                rel = pathlib.PurePosixPath(produced.relative_to(tmp).as_posix())
                dest = out_root / (group.out or "") / (produced.name if group.out else rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(_rewrite(produced.read_text(), group, produced, rel))
                written.append(dest)
    return written


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(path.relative_to(out), file=sys.stderr)
