"""Shared fixtures: real Greet backends on 127.0.0.1; lookaside servers with xDS over a static file, and
stock-grpc xDS client processes (``lookaside_dev.xds_client.Driver``), all stopped at teardown."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from lookaside_dev.backends import Backend

if TYPE_CHECKING:
    from lookaside_dev.xds_client import Driver
    from lookaside_server import RunningServer


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    """Factory starting Greet backends; all of them are stopped at teardown."""
    started: list[Backend] = []

    def start(delay: float = 0.0) -> Backend:
        backend = Backend(delay)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def xds_lookaside() -> Iterator[Callable[..., RunningServer]]:
    """Factory: a lookaside server with xDS (``XdsOptions`` or the defaults) over the static file ``path``."""
    from lookaside_server import ListenConfig, ServerConfig, StaticFileConfig, XdsConfig, run_in_thread

    running: list[RunningServer] = []

    def start(path: str | os.PathLike[str], options: Any = None) -> RunningServer:
        server = run_in_thread(
            ServerConfig(
                listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5),
                source=StaticFileConfig(str(path), poll_interval=0.02),
                xds=XdsConfig(options=options),
            )
        )
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


@pytest.fixture
def xds_driver() -> Iterator[Callable[..., Driver]]:
    """Factory: a stock-grpc xDS client process dialling ``target`` through ``lookaside``."""
    from lookaside_dev.xds_client import Driver

    started: list[Driver] = []

    def start(target: str, lookaside: str, **kw: Any) -> Driver:
        d = Driver(target, lookaside, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()
