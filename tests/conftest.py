"""Shared fixtures: real Greet backends on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from lookaside_dev.backends import Backend


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
