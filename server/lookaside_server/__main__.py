"""CLI entry point: ``lookaside-server`` or ``python -m lookaside_server``; flags fall back to LB_* env."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from lookaside_server._app import LookasideServer
from lookaside_server._cli.security_flags import add_security_arguments, security_config
from lookaside_server._cli.source_flags import add_source_arguments, choose_source
from lookaside_server._config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    AccessConfig,
    HttpConfig,
    ListenConfig,
    SecurityConfig,
    ServerConfig,
    StaticFileConfig,
    XdsConfig,
)
from lookaside_server._security.tls import TlsError
from lookaside_server._sources.static import StaticFileError
from lookaside_server._web.logging import configure as configure_logging

log = logging.getLogger("lookaside_server")
DEFAULT_HTTP_PORT = 8080


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(name) or default


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag defaults to its LB_* environment variable, then a built-in default."""
    p = argparse.ArgumentParser(prog="lookaside-server", description="The lookaside load-balancing server.")
    p.add_argument("--host", default=_env("LB_HOST", DEFAULT_HOST),
                   help="address to bind (LB_HOST; default %(default)s)")
    p.add_argument("--port", type=int, default=int(_env("LB_PORT", str(DEFAULT_PORT)) or DEFAULT_PORT),
                   help="port to bind, 0 for any free port (LB_PORT; default %(default)s)")
    p.add_argument("--http-port", type=int, default=_env("LB_HTTP_PORT", None),
                   help="port of the HTTP status page (/, /status.json, /healthz); 0 for any free port, "
                        f"-1 to turn it off (LB_HTTP_PORT; default {DEFAULT_HTTP_PORT}: if that one is busy, "
                        "the server runs without the page and logs a warning)")
    p.add_argument("--http-host", default=_env("LB_HTTP_HOST", None),
                   help="address the status page binds (LB_HTTP_HOST; default: the same as --host)")
    p.add_argument("--static-file", default=_env("LB_STATIC_FILE", None),
                   help="YAML/JSON file of 'namespace/service' -> endpoints (LB_STATIC_FILE)")
    p.add_argument("--poll-interval", type=float, default=float(_env("LB_POLL_INTERVAL", "1.0") or 1.0),
                   help="seconds between checks of the static file (LB_POLL_INTERVAL; default %(default)s)")
    add_source_arguments(p)
    p.add_argument("--grace", type=float, default=float(_env("LB_GRACE", "5.0") or 5.0),
                   help="seconds in-flight calls get on shutdown (LB_GRACE; default %(default)s)")
    p.add_argument("--log-level", default=_env("LB_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (LB_LOG_LEVEL; default %(default)s)")
    p.add_argument("--xds", action=argparse.BooleanOptionalAction,
                   default=(_env("LB_XDS", "1") or "1").lower() not in ("0", "false", "no", "off"),
                   help="also serve xDS (ADS) on the gRPC port for stock clients dialing "
                        "xds:///<service>.<namespace> (LB_XDS=0 or --no-xds turns it off; default on)")
    add_security_arguments(p)
    return p


def _http_port(flag: int | None) -> int | None:
    """--http-port: None (not given) means the default port, a negative number no HTTP listener."""
    if flag is None:
        return DEFAULT_HTTP_PORT
    return flag if flag >= 0 else None


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
    try:
        security = security_config(args)
    except ValueError as e:
        parser.error(str(e))
    configure_logging(level, args.log_format)
    try:
        chosen = choose_source(args)
    except ValueError as e:
        parser.error(str(e))
    except Exception as e:  # noqa: BLE001 - no usable Kubernetes configuration (ConfigException, OSError)
        parser.error("no endpoint source configured: pass --static-file (LB_STATIC_FILE), or run in a pod "
                     f"or pass --kubeconfig for the Kubernetes source (Kubernetes configuration: {e})")
    source = chosen.source or StaticFileConfig(args.static_file, poll_interval=args.poll_interval,
                                               max_targets=args.max_targets)
    access = AccessConfig(namespaces=chosen.allow_namespaces, services=security["allow_services"],
                          client_identities=security["allow_client_identities"])
    config = ServerConfig(listen=ListenConfig(host=args.host, port=args.port, grace=args.grace),
                          source=source, security=SecurityConfig(tls=security["tls"], access=access),
                          limits=security["limits"],
                          http=HttpConfig(port=_http_port(args.http_port), host=args.http_host,
                                          optional=args.http_port is None),
                          xds=XdsConfig(enabled=args.xds))
    try:
        asyncio.run(serve(config))
    except (StaticFileError, OSError, TlsError) as e:
        log.error("cannot start: %s", e)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
