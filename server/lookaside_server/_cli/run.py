"""Running ``lookaside-server``: flags to :class:`ServerConfig`, serve until SIGTERM/SIGINT, exit codes.

Exit codes: 0 after a clean shutdown; 2 for a usage error (bad flags or LB_* values, no source, TLS files
that are unusable, expired, not yet valid or not a server certificate); 1 if the server cannot start
otherwise (port busy, static file missing or invalid).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

from lookaside_server._app import LookasideServer, ServerConfig
from lookaside_server._cli.flags import build_parser, server_config
from lookaside_server._security.tls import TlsError
from lookaside_server._sources.static import StaticFileError
from lookaside_server._web.logging import configure as configure_logging

log = logging.getLogger("lookaside_server")

EXIT_OK = 0
EXIT_CANNOT_START = 1
EXIT_USAGE = 2


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


def run(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run the server; the process exit code (argparse exits 2 itself on usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(logging, args.log_level), args.log_format)
    try:
        config = server_config(args)
    except ValueError as e:
        parser.error(str(e))
    except Exception as e:  # noqa: BLE001 - no usable Kubernetes configuration (ConfigException, OSError)
        parser.error(
            "no endpoint source configured: pass --static-file (LB_STATIC_FILE), or run in a pod "
            f"or pass --kubeconfig for the Kubernetes source (Kubernetes configuration: {e})"
        )
    try:
        asyncio.run(serve(config))
    except TlsError as e:
        log.error("cannot start: %s", e)
        parser.print_usage()
        return EXIT_USAGE
    except (StaticFileError, OSError) as e:
        log.error("cannot start: %s", e)
        return EXIT_CANNOT_START
    return EXIT_OK
