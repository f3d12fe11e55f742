"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import pathlib


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
