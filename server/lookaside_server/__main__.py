"""CLI entry point: ``lookaside-server`` or ``python -m lookaside_server``; flags fall back to LB_* env."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from lookaside_server._app import DEFAULT_HOST, DEFAULT_PORT, LookasideServer, ServerConfig
from lookaside_server._static import StaticFileError

log = logging.getLogger("lookaside_server")


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(name) or default


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag defaults to its LB_* environment variable, then a built-in default."""
    p = argparse.ArgumentParser(prog="lookaside-server", description="The lookaside load-balancing server.")
    p.add_argument("--host", default=_env("LB_HOST", DEFAULT_HOST),
                   help="address to bind (LB_HOST; default %(default)s)")
    p.add_argument("--port", type=int, default=int(_env("LB_PORT", str(DEFAULT_PORT)) or DEFAULT_PORT),
                   help="port to bind, 0 for any free port (LB_PORT; default %(default)s)")
    p.add_argument("--static-file", default=_env("LB_STATIC_FILE", None),
                   help="YAML/JSON file of 'namespace/service' -> endpoints (LB_STATIC_FILE)")
    p.add_argument("--poll-interval", type=float, default=float(_env("LB_POLL_INTERVAL", "1.0") or 1.0),
                   help="seconds between checks of the static file (LB_POLL_INTERVAL; default %(default)s)")
    p.add_argument("--grace", type=float, default=float(_env("LB_GRACE", "5.0") or 5.0),
                   help="seconds in-flight calls get on shutdown (LB_GRACE; default %(default)s)")
    p.add_argument("--log-level", default=_env("LB_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (LB_LOG_LEVEL; default %(default)s)")
    return p


async def serve(config: ServerConfig) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down cleanly."""
    server = LookasideServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and run the server; exit 2 on bad configuration, 1 if it cannot start, else 0."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ValueError as e:  # a malformed LB_* number
        parser.error(str(e))
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        parser.error(f"unknown log level {args.log_level!r}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.static_file:
        parser.error("no endpoint source configured: pass --static-file or set LB_STATIC_FILE")
    config = ServerConfig(host=args.host, port=args.port, static_file=args.static_file,
                          poll_interval=args.poll_interval, grace=args.grace)
    try:
        asyncio.run(serve(config))
    except (StaticFileError, OSError) as e:
        log.error("cannot start: %s", e)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
