"""CLI entry point: ``lookaside-server`` or ``python -m lookaside_server``; flags fall back to LB_* env.

The flags live in :mod:`lookaside_server._cli` (``flags``, ``source_flags``, ``security_flags``); running
the server and its exit codes in :mod:`lookaside_server._cli.run`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

#: Packages of this distribution: a module missing from these is a broken install, not a missing extra.
_OWN = ("lookaside_grpc", "lookaside_server")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and run the server; exit 2 on bad configuration, 1 if it cannot start (or if the server
    extra is not installed: one line saying what to install, not a traceback), else 0."""
    try:
        from lookaside_server._cli.run import run
    except ModuleNotFoundError as e:
        if not e.name or e.name.partition(".")[0] in _OWN:
            raise
        sys.stderr.write(
            f"lookaside-server: the server needs the 'server' extra (missing module {e.name!r}): "
            "pip install 'lookaside-grpc[server]'\n"
        )
        sys.exit(1)
    sys.exit(run(argv))


def __getattr__(name: str) -> Any:
    """``build_parser`` and ``DEFAULT_HTTP_PORT`` still import from here (they live in ``_cli.flags``)."""
    if name in ("build_parser", "DEFAULT_HTTP_PORT"):
        from lookaside_server._cli import flags

        return getattr(flags, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
