"""Shared fixtures: real Greet backends on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from lookaside_examples.greet.server import GreetServicer, serve


class Backend:
    """One in-process Greet server on a free loopback port."""

    def __init__(self, delay: float = 0.0) -> None:
        self.server, self.servicer, self.port = serve(0, "127.0.0.1", delay=delay)
        self.address = f"127.0.0.1:{self.port}"

    @property
    def stats(self) -> GreetServicer:
        return self.servicer

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)


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
