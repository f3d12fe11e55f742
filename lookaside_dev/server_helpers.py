"""Helpers shared by the lookaside server tests: static files, an in-loop server, deadlines, error details."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb
from lookaside_server import ListenConfig, LookasideServer, ServerConfig, StaticFileConfig, StaticFileSource

DEADLINE = 10.0


def endpoints(n: int, base_port: int = 50051, ip: str = "127.0.0.1", **extra: Any) -> list[dict[str, Any]]:
    """``n`` endpoint entries sharing ``ip`` on consecutive ports, each with ``extra`` fields."""
    return [{"ip": ip, "port": base_port + i, **extra} for i in range(n)]


@dataclass
class Served:
    """A running in-loop server with a client stub and its static file."""

    server: LookasideServer
    stub: pb.LookasideStub
    channel: grpc.aio.Channel
    path: Path

    @property
    def source(self) -> StaticFileSource:
        src = self.server.source
        assert isinstance(src, StaticFileSource)
        return src

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@asynccontextmanager
async def serve(tmp_path: Path, data: Any, poll_interval: float = 0.02) -> AsyncIterator[Served]:
    """Start a LookasideServer on 127.0.0.1 (any port) over a static file holding ``data``."""
    path = tmp_path / "endpoints.yaml"
    write_static(path, data)
    server = LookasideServer(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, grace=1.0),
            source=StaticFileConfig(str(path), poll_interval=poll_interval),
        )
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Served(server, pb.LookasideStub(channel), channel, path)
    finally:
        await channel.close()
        await server.stop(1.0)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = DEADLINE, what: str = "") -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds (a bounded loop)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)


async def read_until(
    stream: Any, check: Callable[[pb.EndpointSet], bool], timeout: float = DEADLINE
) -> pb.EndpointSet:
    """Read a Watch stream until a message satisfies ``check``; fail after ``timeout`` seconds."""

    async def loop() -> pb.EndpointSet:
        while True:
            msg = await stream.read()
            assert msg is not grpc.aio.EOF, "watch stream ended"
            if check(msg):
                return msg

    return await asyncio.wait_for(loop(), timeout)


def bad_field(err: grpc.aio.AioRpcError) -> str:
    """The field named by the BadRequest detail of an INVALID_ARGUMENT error."""
    st = rpc_status.from_call(err)
    assert st is not None, "no google.rpc.Status in trailers"
    for detail in st.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            assert len(br.field_violations) == 1
            return br.field_violations[0].field
    raise AssertionError("no BadRequest detail")


def ports(resp: pb.Response | pb.EndpointSet) -> list[int]:
    """The ports of a response's endpoints, in order."""
    return [e.port for e in resp.endpoints]
