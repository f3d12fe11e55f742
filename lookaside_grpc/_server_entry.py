"""The ``lookaside-server`` console script. It lives in the client package, which every install has, and
hands over to ``lookaside_server.__main__``, which imports nothing heavy before it has checked that the server
extra is installed (without it: one line saying what to install, exit 1)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``lookaside_server``'s command line."""
    server_main: Callable[[Sequence[str] | None], None] = importlib.import_module(
        "lookaside_server.__main__"
    ).main
    server_main(argv)
