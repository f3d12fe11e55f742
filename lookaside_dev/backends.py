"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

from examples.greet.server import GreetServicer, serve


def greet_backend_of(result: str) -> str:
    """The backend address a Greet answer is signed with."""
    return result.rsplit(" from ", 1)[-1].split(" #")[0]


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
