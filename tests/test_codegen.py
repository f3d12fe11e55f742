"""The committed generated code must match what ``python3 dev.py proto`` produces from proto/."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date(tmp_path: pathlib.Path) -> None:
    written = _generator().generate(tmp_path)
    assert len(written) == 6
    stale = [
        str(p.relative_to(tmp_path))
        for p in written
        if not (ROOT / p.relative_to(tmp_path)).exists()
        or (ROOT / p.relative_to(tmp_path)).read_text() != p.read_text()
    ]
    assert not stale, f"generated code is stale, run `python3 dev.py proto`: {stale}"


def test_original_wire_shape_is_kept() -> None:
    """Field names and numbers of the original Go design must never change."""
    from lookaside_grpc import protocol

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
