"""The one static endpoint-file writer used by tests, benchmarks and the demo: atomic replacement, as
editors and ConfigMap updates do, so a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_static(path: Path, data: Any) -> None:
    """Atomically replace ``path`` with ``data`` (a mapping as JSON, or raw text)."""
    text = data if isinstance(data, str) else json.dumps(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_addresses(path: Path, targets: Mapping[str, Sequence[str]], **extra: object) -> None:
    """Atomically write a static file mapping ``namespace/service`` to ``host:port`` addresses, each entry
    with the ``extra`` fields (e.g. ``port_name="grpc"``)."""
    write_static(
        path,
        {
            target: [
                {"ip": a.rsplit(":", 1)[0], "port": int(a.rsplit(":", 1)[1]), **extra} for a in addresses
            ]
            for target, addresses in targets.items()
        },
    )
