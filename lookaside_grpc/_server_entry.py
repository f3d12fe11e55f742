"""The ``lookaside-server`` console script. It lives in the client package, which every install has, so that
without the server extra it can say what to install instead of failing with a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

#: Packages of this distribution: a module missing from these is a broken install, not a missing extra.
_OWN = ("lookaside_grpc", "lookaside_server")


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``lookaside_server``'s command line, or exit 1 with one line if the server extra is missing."""
    try:
        server = importlib.import_module("lookaside_server.__main__")
    except ModuleNotFoundError as e:
        if not e.name or e.name.partition(".")[0] in _OWN:
            raise
        sys.stderr.write(
            f"lookaside-server: the server needs the 'server' extra (missing module {e.name!r}): "
            "pip install 'lookaside-grpc[server]'\n"
        )
        sys.exit(1)
    server_main: Callable[[Sequence[str] | None], None] = server.main
    server_main(argv)
