"""The static file source: format validation, change detection, broken edits, removals, symlink swaps."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from lookaside_dev.server_helpers import endpoints, ports, read_until, serve
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb
from lookaside_server import BackendEndpoint, StaticFileError, StaticFileSource, Target, TargetNotFound
from lookaside_server._sources.static import parse_static

T = "default/greet"
TARGET = Target("greet", "default")
WATCH = pb.WatchRequest(service="greet", namespace="default")


def test_parse_yaml_with_defaults() -> None:
    text = """
default/greet:
  - ip: 10.0.0.1
    port: 50051
    port_name: grpc
    zone: z1
    for_zones: [z1]
  - {ip: "fd00::1", port: 50051, ready: false, serving: true, terminating: true}
  - {ip: 10.0.0.3, port: 50051, ready: false}
"""
    got = parse_static(text)
    assert got == {
        TARGET: (
            BackendEndpoint("10.0.0.1", 50051, "grpc", "z1", ("z1",)),
            BackendEndpoint("fd00::1", 50051, ready=False, serving=True, terminating=True),
            BackendEndpoint("10.0.0.3", 50051, ready=False, serving=False),
        )
    }
    assert parse_static('{"a/b": []}') == {Target("b", "a"): ()}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("default/greet: [", "YAML"),
        ("", "empty"),
        ("- a", "mapping"),
        ("greet: []", "namespace/service"),
        ("Default/greet: []", "namespace"),
        ("default/Greet: []", "service"),
        ("default/greet: {ip: 1.2.3.4}", "list"),
        ("default/greet: [{ip: 1.2.3.256, port: 80}]", "1.2.3.256"),
        ("default/greet: [{ip: 10.0.0.1, port: 0}]", "port"),
        ("default/greet: [{ip: 10.0.0.1, port: 65536}]", "port"),
        ("default/greet: [{ip: 10.0.0.1, port: '80'}]", "port"),
        ("default/greet: [{ip: 10.0.0.1, port: true}]", "port"),
        ("default/greet: [{port: 80}]", "ip"),
        ("default/greet: [{ip: 10.0.0.1, port: 80, ready: 'yes'}]", "ready"),
        ("default/greet: [{ip: 10.0.0.1, port: 80, port_name: GRPC}]", "port_name"),
        ("default/greet: [{ip: 10.0.0.1, port: 80, port_name: '80'}]", "port_name"),
        ("default/greet: [{ip: 10.0.0.1, port: 80, colour: red}]", "colour"),
        ("default/greet: [{ip: 10.0.0.1, port: 80, terminating: true}]", "terminating"),
    ],
)
def test_parse_rejects(text: str, why: str) -> None:
    with pytest.raises(StaticFileError, match=why):
        parse_static(text)


async def test_missing_or_broken_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(StaticFileError, match="cannot read"):
        await StaticFileSource(tmp_path / "nope.yaml").start(lambda t, e: None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("default/greet: [")
    with pytest.raises(StaticFileError, match="YAML"):
        await StaticFileSource(bad).start(lambda t, e: None)


async def test_source_publishes_changes_and_removals(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    write_static(path, {T: endpoints(1), "default/other": endpoints(1)})
    published: list[tuple[Target, object]] = []
    src = StaticFileSource(path, poll_interval=3600)
    await src.start(lambda t, e: published.append((t, e)))
    try:
        with pytest.raises(TargetNotFound):
            await src.subscribe(Target("nope", "default"))
        await src.subscribe(TARGET)
        assert published == [(TARGET, (BackendEndpoint("127.0.0.1", 50051),))]
        write_static(path, {T: endpoints(1), "default/other": endpoints(2)})
        assert await src.check_now()
        assert len(published) == 1  # unsubscribed or unchanged targets are not published
        write_static(path, {"default/other": endpoints(2)})
        assert await src.check_now()
        assert published[-1] == (TARGET, None)
        assert not await src.check_now()  # nothing changed
        await src.unsubscribe(TARGET)
        write_static(path, {T: endpoints(3)})
        assert await src.check_now()
        assert published[-1] == (TARGET, None)
    finally:
        await src.stop()


async def test_broken_edit_keeps_last_good_set(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with serve(tmp_path, {T: endpoints(2)}) as s:
        stream = s.stub.Watch(WATCH)
        assert ports(await read_until(stream, lambda m: True)) == [50051, 50052]
        with caplog.at_level(logging.WARNING, logger="lookaside_server"):
            write_static(s.path, "default/greet: [{ip: 10.0.0.300, port: 80}]")
            # deterministic: run one check ourselves (the poller may also have run one already)
            assert not await s.source.check_now()
            assert "10.0.0.300" in caplog.text and "keeping the last good set" in caplog.text
        resp = await s.stub.Resolve(
            pb.Request(router=pb.ROUNDROBIN, service="greet", namespace="default", count=2)
        )
        assert ports(resp) == [50051, 50052] and resp.version == 1
        # a missing file is tolerated as well
        os.remove(s.path)
        assert not await s.source.check_now()
        write_static(s.path, {T: endpoints(3)})
        fixed = await read_until(stream, lambda m: True)
        assert (fixed.version, ports(fixed)) == (2, [50051, 50052, 50053])
        stream.cancel()


async def test_configmap_symlink_swap(tmp_path: Path) -> None:
    """Kubernetes ConfigMap volumes: file -> ..data/file, and ..data is swapped atomically to a new dir."""
    root = tmp_path / "cm"
    (root / "v1").mkdir(parents=True)
    write_static(root / "v1" / "endpoints.yaml", {T: endpoints(1)})
    os.symlink("v1", root / "..data")
    os.symlink("..data/endpoints.yaml", root / "endpoints.yaml")
    src = StaticFileSource(root / "endpoints.yaml", poll_interval=3600)
    published: list[tuple[Target, object]] = []
    await src.start(lambda t, e: published.append((t, e)))
    try:
        await src.subscribe(TARGET)
        (root / "v2").mkdir()
        write_static(root / "v2" / "endpoints.yaml", {T: endpoints(2)})
        os.symlink("v2", root / "..data_tmp")
        os.replace(root / "..data_tmp", root / "..data")
        assert await src.check_now()
        assert published[-1] == (TARGET, tuple(BackendEndpoint("127.0.0.1", p) for p in (50051, 50052)))
    finally:
        await src.stop()
