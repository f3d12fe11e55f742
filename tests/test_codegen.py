"""Generated code: committed files match ``python3 dev.py proto`` (made with the pinned oldest generator), the
wire shape of the original design is kept, and stubs generated from the original ``lookaside.proto`` can
live in the same process as ``lookaside_grpc``."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
from types import ModuleType

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: A copy of ``proto/lookaside.proto`` as applications generated their stubs from it before the move to
#: ``lookaside/v1/`` (same package, same symbols, file name ``lookaside.proto``).
ORIGINAL_PROTO = ROOT / "tests" / "data" / "lookaside.proto"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _proto_python() -> pathlib.Path:
    """The Python of ``.venv-proto`` (created by ``python3 dev.py proto`` and ``python3 dev.py test``)."""
    bin_dir = "Scripts" if os.name == "nt" else "bin"
    path = pathlib.Path(os.environ.get("LOOKASIDE_PROTO_PYTHON") or ROOT / ".venv-proto" / bin_dir / "python")
    if not path.exists():
        message = f"{path} is missing: run `python3 dev.py proto` once (it creates the generator venv)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_generated_code_is_up_to_date(tmp_path: pathlib.Path) -> None:
    generator = _generator()
    python = _proto_python()
    tools = subprocess.run(
        [python, "-c", "from importlib import metadata; print(metadata.version('grpcio-tools'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert f"grpcio-tools=={tools}" == generator.GRPC_TOOLS, "re-create .venv-proto: `python3 dev.py proto`"
    subprocess.run([python, ROOT / "proto" / "generate.py", tmp_path], check=True, capture_output=True)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) >= 8
    stale = [
        str(p)
        for p in written
        if not (ROOT / p).exists() or (ROOT / p).read_text() != (tmp_path / p).read_text()
    ]
    assert not stale, f"generated code is stale, run `python3 dev.py proto`: {stale}"
    # No leftovers of files the generator no longer writes, next to the ones it does.
    folders = {p.parent for p in written}
    committed = sorted(p.relative_to(ROOT) for f in folders for p in (ROOT / f).glob("*_pb2*.py*"))
    assert committed == [p for p in written if p.parent in folders]


def test_original_wire_shape_is_kept() -> None:
    """Field names and numbers of the original Go design must never change; the file name may."""
    from lookaside_grpc import protocol

    assert protocol.DESCRIPTOR.name == "lookaside/v1/lookaside.proto"
    req = protocol.Request.DESCRIPTOR
    assert protocol.DESCRIPTOR.package == "lookaside"
    original = {f.name: f.number for f in req.fields if f.number <= 3}
    assert original == {"router": 1, "service": 2, "namespace": 3}
    assert {v.name: v.number for v in req.enum_types_by_name["RouterType"].values[:2]} == {
        "RANDOM": 0,
        "ROUNDROBIN": 1,
    }
    assert protocol.Response.DESCRIPTOR.fields_by_number[1].name == "address"
    method = protocol.DESCRIPTOR.services_by_name["Lookaside"].methods_by_name["Resolve"]
    types = (method.input_type.full_name, method.output_type.full_name)
    assert types == ("lookaside.Request", "lookaside.Response")


def test_every_field_of_the_moved_proto_is_unchanged(tmp_path: pathlib.Path) -> None:
    """Moving the file changed nothing on the wire: every message, field, number and type is the same as in
    the original file (compiled here from ``tests/data/lookaside.proto``)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    from lookaside_grpc import protocol

    out = tmp_path / "original.pb"
    assert protoc.main(["protoc", f"-I{ORIGINAL_PROTO.parent}", f"-o{out}", str(ORIGINAL_PROTO)]) == 0
    original = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    moved = descriptor_pb2.FileDescriptorProto.FromString(protocol.DESCRIPTOR.serialized_pb)
    assert (original.name, moved.name) == ("lookaside.proto", "lookaside/v1/lookaside.proto")
    original.ClearField("name")
    moved.ClearField("name")
    messages = list(original.message_type)
    while messages:  # `protoc -o` spells out json_name; generated code leaves it implicit
        message = messages.pop()
        messages.extend(message.nested_type)
        for f in message.field:
            f.ClearField("json_name")
    assert moved == original


APP = """
import sys
from concurrent import futures

import grpc

{first}
{second}

# Both live in one process: the application's stubs in the default pool, lookaside_grpc's in its own.
assert lookaside_pb2.DESCRIPTOR.name == "lookaside.proto"
assert protocol.DESCRIPTOR.name == "lookaside/v1/lookaside.proto"
assert protocol.add_to_default_pool() is False  # the default pool has the application's lookaside symbols
wire = lookaside_pb2.Request(router=1, service="greet", namespace="default").SerializeToString()
assert protocol.Request.FromString(wire).service == "greet"


class Servicer(protocol.LookasideServicer):
    def Resolve(self, request, context):
        return protocol.Response(address="10.0.0.1", port=50051)


server = grpc.server(futures.ThreadPoolExecutor(2))
protocol.add_LookasideServicer_to_server(Servicer(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with grpc.insecure_channel(f"127.0.0.1:{{port}}") as channel:
    app_answer = lookaside_pb2_grpc.LookasideStub(channel).Resolve(
        lookaside_pb2.Request(service="greet", namespace="default"), timeout=10
    )
    ours = protocol.LookasideStub(channel).Resolve(protocol.Request(service="greet"), timeout=10)
server.stop(None)
assert (app_answer.address, ours.port) == ("10.0.0.1", 50051)
print("ok")
"""
APP_STUBS = "import lookaside_pb2, lookaside_pb2_grpc"
OURS = "import lookaside_grpc, lookaside_grpc.aio\nfrom lookaside_grpc import protocol"


@pytest.mark.parametrize("app_first", [True, False], ids=["app-stubs-first", "lookaside_grpc-first"])
def test_original_lookaside_proto_stubs_import_alongside(tmp_path: pathlib.Path, app_first: bool) -> None:
    """An application that holds stubs generated from the original ``lookaside.proto`` (same package, same
    symbols) imports them and ``lookaside_grpc`` in either order, and both talk on the wire."""
    compiled = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ORIGINAL_PROTO.parent}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ORIGINAL_PROTO),
        ],
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, compiled.stderr
    first, second = (APP_STUBS, OURS) if app_first else (OURS, APP_STUBS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-c", APP.format(first=first, second=second)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


#: A copy of the original design's ``greet.proto`` (the Go lookaside demo): file name ``greet.proto``,
#: package ``greet``, ``rpc Greet(GreetingRequest) returns (GreetingResponse)``.
ORIGINAL_GREET_PROTO = ROOT / "tests" / "data" / "greet.proto"


def _compile_original_greet(out: pathlib.Path) -> None:
    """``greet_pb2``/``greet_pb2_grpc`` from the original greet.proto into ``out``, as its users made them."""
    compiled = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ORIGINAL_GREET_PROTO.parent}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(ORIGINAL_GREET_PROTO),
        ],
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, compiled.stderr


def test_greet_example_keeps_the_original_greet_messages(tmp_path: pathlib.Path) -> None:
    """Every message of the original greet.proto, and its Greet method, are unchanged in the example's."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    from examples.greet import greet_pb2

    out = tmp_path / "original.pb"
    assert (
        protoc.main(["protoc", f"-I{ORIGINAL_GREET_PROTO.parent}", f"-o{out}", str(ORIGINAL_GREET_PROTO)])
        == 0
    )
    original = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    ours = descriptor_pb2.FileDescriptorProto.FromString(greet_pb2.DESCRIPTOR.serialized_pb)
    assert (original.package, ours.package) == ("greet", "greet")
    for message in original.message_type:
        for f in message.field:  # `protoc -o` spells out json_name; generated code leaves it implicit
            f.ClearField("json_name")
    ours_by_name = {m.name: m for m in ours.message_type}
    assert {m.name for m in original.message_type} == {"Greeting", "GreetingRequest", "GreetingResponse"}
    for message in original.message_type:
        assert ours_by_name[message.name] == message
    (service,) = original.service
    (our_service,) = [s for s in ours.service if s.name == service.name]
    our_methods = {m.name: m for m in our_service.method}
    for method in service.method:
        assert our_methods[method.name] == method


ORIGINAL_GREET_CLIENT = """
import sys

import grpc
import greet_pb2, greet_pb2_grpc

assert greet_pb2.DESCRIPTOR.name == "greet.proto"  # the original stubs, not the example's
request = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="Ada", last_name="Lovelace"))
with grpc.insecure_channel(sys.argv[1]) as channel:
    print(greet_pb2_grpc.GreetServiceStub(channel).Greet(request, timeout=10).result)
"""

ORIGINAL_GREET_SERVER = """
import sys
from concurrent import futures

import grpc
import greet_pb2, greet_pb2_grpc


class Servicer(greet_pb2_grpc.GreetServiceServicer):
    def Greet(self, request, context):
        g = request.greeting
        return greet_pb2.GreetingResponse(result=f"original server greets {g.first_name} {g.last_name}")


server = grpc.server(futures.ThreadPoolExecutor(2))
greet_pb2_grpc.add_GreetServiceServicer_to_server(Servicer(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()  # until the test closes stdin
server.stop(None)
"""


def test_original_greet_client_talks_to_the_example_server(tmp_path: pathlib.Path) -> None:
    """A client generated from the original greet.proto (its own process: the original and the example's
    stubs define the same symbols) calls the example's Greet server and gets its own names back."""
    from examples.greet.server import serve

    _compile_original_greet(tmp_path)
    server, servicer, port = serve(0)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", ORIGINAL_GREET_CLIENT, f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
        )
    finally:
        server.stop(None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"Hello Ada Lovelace from 127.0.0.1:{port}\n"
    assert servicer.calls == 1


def test_example_greet_client_talks_to_an_original_server(tmp_path: pathlib.Path) -> None:
    """The reverse: the example's stubs call a server generated from the original greet.proto."""
    import grpc

    from examples.greet import greet_pb2, greet_pb2_grpc

    _compile_original_greet(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", ORIGINAL_GREET_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), proc.communicate(timeout=30)[1]
        port = int(line)
        request = greet_pb2.GreetingRequest(
            greeting=greet_pb2.Greeting(first_name="Ada", last_name="Lovelace")
        )
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = greet_pb2_grpc.GreetServiceStub(channel).Greet(request, timeout=10)
        assert reply.result == "original server greets Ada Lovelace"
    finally:
        _, stderr = proc.communicate(input="", timeout=30)
    assert proc.returncode == 0, stderr
