"""CLI entry point: ``lookaside-server`` or ``python -m lookaside_server``; flags fall back to LB_* env.

The flags live in :mod:`lookaside_server._cli` (``flags``, ``source_flags``, ``security_flags``); running
the server and its exit codes in :mod:`lookaside_server._cli.run`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and run the server; exit 2 on bad configuration, 1 if it cannot start, else 0."""
    from lookaside_server._cli.run import run

    sys.exit(run(argv))


def __getattr__(name: str) -> Any:
    """``build_parser`` and ``DEFAULT_HTTP_PORT`` still import from here (they live in ``_cli.flags``)."""
    if name in ("build_parser", "DEFAULT_HTTP_PORT"):
        from lookaside_server._cli import flags

        return getattr(flags, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
