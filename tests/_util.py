"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import pathlib

from lookaside_examples.greet.server import GreetServicer, serve


def write_static(path: pathlib.Path, targets: dict[str, list[str]], **extra: object) -> None:
    """Atomically write a static endpoint file mapping ``ns/svc`` to ``host:port`` addresses."""
    data = {
        target: [{"ip": a.rsplit(":", 1)[0], "port": int(a.rsplit(":", 1)[1]), **extra} for a in addresses]
        for target, addresses in targets.items()
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


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
