"""The ``lookaside-server`` flags: each falls back to an ``LB_*`` environment variable, then a default.

:func:`env_argument` is the one way a flag gets its environment fallback: the variable's text becomes the
flag's default *as text*, so argparse converts and checks it like a value given on the command line. A bad
value (``LB_PORT=abc``) is then a usage error (exit 2) naming the variable, never a traceback, and
``--help`` works whatever the environment holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from importlib import metadata
from typing import Any

from lookaside_server._config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    HttpConfig,
    ListenConfig,
    ServerConfig,
    StaticFileConfig,
    XdsConfig,
)

#: The status page's port when --http-port is not given (if it is busy the server runs without the page).
DEFAULT_HTTP_PORT = 8080
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_FALSE = ("0", "false", "no", "off")


def env_text(name: str) -> str | None:
    """The value of environment variable ``name``; None when it is unset or empty."""
    return os.environ.get(name) or None


def env_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *flags: str,
    env: str,
    default: Any = None,
    type: Callable[[str], Any] | None = None,
    help: str = "",
    **kwargs: Any,
) -> argparse.Action:
    """Add a flag falling back to environment variable ``env``, then to ``default``.

    The variable's text is handed to argparse as the default, so ``type`` converts and checks it exactly
    like a command-line value: a bad value is a usage error (exit 2) saying where it came from. The help
    text gets ``(ENV; default ...)`` appended.
    """
    raw = env_text(env)
    if type is not None:
        type = _naming(type, env, raw)
    shown = "" if kwargs.get("action") in ("append",) else "; default %(default)s"
    return parser.add_argument(
        *flags,
        default=raw if raw is not None else default,
        type=type,
        help=f"{help} ({env}{shown})" if help else f"({env}{shown})",
        **kwargs,
    )


def _naming(convert: Callable[[str], Any], env: str, raw: str | None) -> Callable[[str], Any]:
    """``convert`` whose errors say the value came from ``env`` when it did."""

    def checked(text: str) -> Any:
        try:
            return convert(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            origin = f" (from {env})" if raw is not None and text == raw else ""
            why = str(e) if isinstance(e, argparse.ArgumentTypeError) else f"not a valid {_kind(convert)}"
            raise argparse.ArgumentTypeError(f"{text!r}{origin}: {why}") from None

    checked.__name__ = getattr(convert, "__name__", "value")
    return checked


def _kind(convert: Callable[[str], Any]) -> str:
    return {"int": "integer", "float": "number"}.get(getattr(convert, "__name__", ""), "value")


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer within [minimum, maximum]."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not an integer") from None
        _check_range(value, minimum, maximum)
        return value

    convert.__name__ = "int"
    return convert


def number(minimum: float | None = None, *, above: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number at least ``minimum`` (or strictly above ``above``)."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError("must be a finite number")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be above {above:g}")
        _check_range(value, minimum, None)
        return value

    convert.__name__ = "float"
    return convert


def _check_range(value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum:g}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum:g}")


def one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """An argparse type: one of ``choices`` (argparse does not check ``choices`` on defaults, i.e. on
    values from the environment)."""

    def convert(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}")
        return text

    convert.__name__ = "choice"
    return convert


def boolean(text: str) -> bool:
    """An argparse type for LB_* switches: 0/false/no/off are False, anything else True."""
    return text.strip().lower() not in _FALSE


def log_level(text: str) -> str:
    """An argparse type: a logging level name."""
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def version() -> str:
    """The installed lookaside-grpc version (``--version``)."""
    try:
        return metadata.version("lookaside-grpc")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``lookaside-server`` argument parser."""
    from lookaside_server._cli.security_flags import add_security_arguments
    from lookaside_server._cli.source_flags import add_source_arguments

    p = argparse.ArgumentParser(prog="lookaside-server", description="The lookaside load-balancing server.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    env_argument(p, "--host", env="LB_HOST", default=DEFAULT_HOST, help="address to bind")
    env_argument(
        p,
        "--port",
        env="LB_PORT",
        type=integer(0, 65535),
        default=DEFAULT_PORT,
        help="port to bind, 0 for any free port",
    )
    env_argument(
        p,
        "--http-port",
        env="LB_HTTP_PORT",
        type=integer(-1, 65535),
        default=None,
        help="port of the HTTP status page (/, /status.json, /healthz, /metrics); 0 for any free "
        f"port, -1 to turn it off (if not given: {DEFAULT_HTTP_PORT}, and if that one is busy "
        "the server runs without the page and logs a warning)",
    )
    env_argument(p, "--http-host", env="LB_HTTP_HOST", help="address the status page binds (default: --host)")
    add_source_arguments(p)
    env_argument(
        p,
        "--grace",
        env="LB_GRACE",
        type=number(0),
        default=5.0,
        help="seconds in-flight calls get on shutdown",
    )
    env_argument(
        p,
        "--log-level",
        env="LB_LOG_LEVEL",
        type=log_level,
        default="INFO",
        help="DEBUG, INFO, WARNING or ERROR",
    )
    p.add_argument(
        "--xds",
        action=argparse.BooleanOptionalAction,
        default=boolean(env_text("LB_XDS") or "1"),
        help="also serve xDS (ADS) on the gRPC port for stock clients dialing "
        "xds:///<service>.<namespace> (LB_XDS=0 or --no-xds turns it off; default on)",
    )
    _add_xds_routing_arguments(p)
    add_security_arguments(p)
    return p


def _add_xds_routing_arguments(p: argparse.ArgumentParser) -> None:
    """The xDS routing flags (zones, consistent hashing, WRR); see the README's xDS section."""
    from lookaside_server._xds import LB_POLICIES, MAX_ZONES, ROUND_ROBIN

    x = p.add_argument_group("xDS routing (stock xds:/// clients)")
    env_argument(
        x,
        "--xds-max-zones",
        env="LB_XDS_MAX_ZONES",
        type=integer(0),
        default=MAX_ZONES,
        help="zone-aware endpoints for clients whose xDS bootstrap names a zone (node.locality.zone): "
        "their zone at priority 0, spill-over weighted in when it is short of endpoints, other zones "
        "at priority 1; at most this many distinct client zones at once (streams of further zones get "
        "zone-unaware endpoints, counted as the limit xds_max_zones); 0 = ignore zones",
    )
    env_argument(
        x,
        "--xds-lb-policy",
        env="LB_XDS_LB_POLICY",
        type=one_of(LB_POLICIES),
        default=ROUND_ROBIN,
        help="endpoint picking of targets without a hash header: round_robin, or wrr (gRPC's "
        "client_side_weighted_round_robin from the backends' ORCA endpoint-load-metrics-bin "
        "trailers; grpcio >= 1.55, older clients fall back to round_robin)",
    )
    x.add_argument(
        "--xds-hash-header",
        action="append",
        default=None,
        metavar="[NS/SVC=]HEADER",
        help="consistent hashing (RING_HASH) on a request header: HEADER for every target or "
        "ns/svc=HEADER for one (wins over the first form); repeatable or comma-separated "
        "(LB_XDS_HASH_HEADERS)",
    )


def _xds_routing(args: argparse.Namespace, xds: XdsConfig) -> XdsConfig:
    """``xds`` with the xDS routing flags applied; ValueError for a bad value."""
    from lookaside_server._xds import MAX_ZONES, ROUND_ROBIN, parse_hash_headers

    raw = args.xds_hash_header or ([v] if (v := env_text("LB_XDS_HASH_HEADERS")) else [])
    headers = parse_hash_headers(raw)
    if args.xds_max_zones == MAX_ZONES and args.xds_lb_policy == ROUND_ROBIN and not headers:
        return xds
    try:
        from lookaside_server._xds.resources import XdsOptions
    except ImportError:  # no xds-protos: xDS is off anyway (the server says so at start)
        return xds
    options = dataclasses.replace(
        xds.options or XdsOptions(),
        max_zones=args.xds_max_zones,
        lb_policy=args.xds_lb_policy,
        hash_headers=headers,
    )
    return dataclasses.replace(xds, options=options)


def _http(flag: int | None) -> HttpConfig:
    """--http-port: not given = the default port (optional: a busy port is a warning), negative = off."""
    return HttpConfig(
        port=DEFAULT_HTTP_PORT if flag is None else flag if flag >= 0 else None, optional=flag is None
    )


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` the parsed flags describe; ValueError for inconsistent flags. Builds the
    Kubernetes source when the flags ask for it (kubernetes ConfigException/OSError without a usable
    Kubernetes configuration)."""
    from lookaside_server._cli.security_flags import (
        http_limits_config,
        limits_config,
        security_config,
        xds_config,
    )
    from lookaside_server._cli.source_flags import choose_source

    chosen = choose_source(args)
    source = chosen.source or StaticFileConfig(
        args.static_file, poll_interval=args.poll_interval, max_targets=args.max_targets
    )
    http = _http(args.http_port)
    return ServerConfig(
        listen=ListenConfig(host=args.host, port=args.port, grace=args.grace),
        source=source,
        security=security_config(args, chosen.allow_namespaces),
        limits=limits_config(args),
        http=HttpConfig(
            port=http.port, host=args.http_host, optional=http.optional, limits=http_limits_config(args)
        ),
        xds=_xds_routing(args, xds_config(args)),
    )
