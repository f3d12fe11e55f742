"""Server flags for TLS, access rules, limits and log format; each falls back to an LB_* environment var."""

from __future__ import annotations

import argparse
import os
from typing import Any

from lookaside_server._security.access import parse_identities, parse_service_rules
from lookaside_server._security.limits import Limits
from lookaside_server._security.tls import DEFAULT_CHECK_INTERVAL, tls_config_from
from lookaside_server._web.logging import FORMATS

_D = Limits()


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _num(name: str, default: float) -> float:
    value = _env(name)
    return float(value) if value is not None else default


def add_security_arguments(p: argparse.ArgumentParser) -> None:
    """TLS, access, limit and log-format flags."""
    g = p.add_argument_group("transport security (TLS)")
    g.add_argument("--tls-cert", default=_env("LB_TLS_CERT"), metavar="PEM",
                   help="server certificate chain; with --tls-key turns TLS on for the gRPC port (xDS "
                        "included); re-read when the file changes, no restart needed (LB_TLS_CERT)")
    g.add_argument("--tls-key", default=_env("LB_TLS_KEY"), metavar="PEM",
                   help="private key of --tls-cert, unencrypted PEM (LB_TLS_KEY)")
    g.add_argument("--tls-client-ca", default=_env("LB_TLS_CLIENT_CA"), metavar="PEM",
                   help="CA bundle for client certificates: given = mutual TLS, every client must present a "
                        "certificate signed by it (LB_TLS_CLIENT_CA)")
    g.add_argument("--tls-reload-interval", type=float,
                   default=_num("LB_TLS_RELOAD_INTERVAL", DEFAULT_CHECK_INTERVAL), metavar="SECONDS",
                   help="look at the TLS files at most this often, on new handshakes "
                        "(LB_TLS_RELOAD_INTERVAL; default %(default)s)")

    a = p.add_argument_group("access control")
    a.add_argument("--allow-service", action="append", default=None, metavar="NS/SVC",
                   help="a Service clients may resolve, 'ns/*' for all of a namespace; repeatable or "
                        "comma-separated. Once a namespace has a rule only its listed Services may be "
                        "resolved; namespaces without rules are unaffected (LB_ALLOW_SERVICES)")
    a.add_argument("--allow-client-identity", action="append", default=None, metavar="GLOB",
                   help="client certificate identity allowed to call (SAN URI such as "
                        "spiffe://cluster.local/ns/x/sa/y, DNS name or IP; subject CN if no SAN; glob "
                        "patterns); repeatable or comma-separated; needs --tls-client-ca. Health checks are "
                        "exempt (LB_ALLOW_CLIENT_IDENTITIES; default: any client the CA vouches for)")

    lim = p.add_argument_group("limits")
    lim.add_argument("--max-message-bytes", type=int,
                     default=int(_num("LB_MAX_MESSAGE_BYTES", _D.max_message_bytes)),
                     help="largest request message accepted; larger ones get RESOURCE_EXHAUSTED "
                          "(LB_MAX_MESSAGE_BYTES; default %(default)s)")
    lim.add_argument("--max-watches", type=int, default=int(_num("LB_MAX_WATCHES", _D.max_watches)),
                     help="most Watch and xDS streams open at once (LB_MAX_WATCHES; default %(default)s)")
    lim.add_argument("--max-watches-per-peer", type=int,
                     default=int(_num("LB_MAX_WATCHES_PER_PEER", _D.max_watches_per_peer)),
                     help="most Watch and xDS streams open at once per client IP "
                          "(LB_MAX_WATCHES_PER_PEER; default %(default)s)")
    lim.add_argument("--max-concurrent-rpcs", type=int, default=int(_num("LB_MAX_CONCURRENT_RPCS", 0)),
                     help="most RPCs in progress, streams included; 0 = no limit (LB_MAX_CONCURRENT_RPCS; "
                          "default %(default)s)")
    lim.add_argument("--max-pending-requests", type=int,
                     default=int(_num("LB_MAX_PENDING_REQUESTS", _D.max_pending_requests)),
                     help="calls queued for the server before new ones are cancelled (grpc's own default "
                          "is 1000) (LB_MAX_PENDING_REQUESTS; default %(default)s)")
    lim.add_argument("--keepalive-time", type=float, default=_num("LB_KEEPALIVE_TIME", _D.keepalive_time),
                     help="seconds between the server's keepalive pings (LB_KEEPALIVE_TIME; default "
                          "%(default)s)")
    lim.add_argument("--keepalive-timeout", type=float,
                     default=_num("LB_KEEPALIVE_TIMEOUT", _D.keepalive_timeout),
                     help="seconds a ping may go unanswered before the connection is dropped "
                          "(LB_KEEPALIVE_TIMEOUT; default %(default)s)")
    lim.add_argument("--min-ping-interval", type=float,
                     default=_num("LB_MIN_PING_INTERVAL", _D.min_ping_interval),
                     help="clients may send keepalive pings at most this often, in seconds "
                          "(LB_MIN_PING_INTERVAL; default %(default)s)")
    lim.add_argument("--max-connection-idle", type=float,
                     default=_num("LB_MAX_CONNECTION_IDLE", _D.max_connection_idle or 0),
                     help="close connections without RPCs for this many seconds; 0 = never "
                          "(LB_MAX_CONNECTION_IDLE; default %(default)s)")
    lim.add_argument("--max-connection-age", type=float, default=_num("LB_MAX_CONNECTION_AGE", 0),
                     help="close connections after this many seconds (streams get 30 s grace; clients "
                          "reconnect, e.g. to another replica); 0 = never (LB_MAX_CONNECTION_AGE; default "
                          "%(default)s)")

    p.add_argument("--log-format", choices=FORMATS, default=_env("LB_LOG_FORMAT", "text"),
                   help="'text' or 'json' (one object per line with time, level, logger, message and, "
                        "where known, target and peer) (LB_LOG_FORMAT; default %(default)s)")


def _list(flag: list[str] | None, env: str) -> list[str] | None:
    if flag:
        return flag
    value = os.environ.get(env)
    return [value] if value else None


def security_config(args: argparse.Namespace) -> dict[str, Any]:
    """ServerConfig keyword arguments from the flags; ValueError for bad values."""
    if args.log_format not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, not {args.log_format!r}")
    tls = tls_config_from(args.tls_cert, args.tls_key, args.tls_client_ca, args.tls_reload_interval)
    identities = parse_identities(_list(args.allow_client_identity, "LB_ALLOW_CLIENT_IDENTITIES"))
    if identities is not None and (tls is None or not tls.mutual):
        raise ValueError("--allow-client-identity (LB_ALLOW_CLIENT_IDENTITIES) needs mutual TLS: "
                         "--tls-cert, --tls-key and --tls-client-ca")
    for name in ("keepalive_time", "keepalive_timeout", "min_ping_interval"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    limits = Limits(
        max_message_bytes=args.max_message_bytes,
        max_watches=args.max_watches,
        max_watches_per_peer=args.max_watches_per_peer,
        max_concurrent_rpcs=args.max_concurrent_rpcs or None,
        max_pending_requests=args.max_pending_requests,
        keepalive_time=args.keepalive_time,
        keepalive_timeout=args.keepalive_timeout,
        min_ping_interval=args.min_ping_interval,
        max_connection_idle=args.max_connection_idle or None,
        max_connection_age=args.max_connection_age or None,
    )
    return {
        "tls": tls,
        "allow_services": parse_service_rules(_list(args.allow_service, "LB_ALLOW_SERVICES")) or None,
        "allow_client_identities": identities,
        "limits": limits,
        "max_targets": getattr(args, "max_targets", None),
    }
