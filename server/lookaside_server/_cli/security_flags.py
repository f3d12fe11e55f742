"""Server flags for TLS, access rules, limits and log format; each falls back to an LB_* environment var."""

from __future__ import annotations

import argparse
import os

from lookaside_server._cli.flags import env_argument, integer, number, one_of
from lookaside_server._config import AccessConfig, SecurityConfig, XdsConfig
from lookaside_server._security.access import parse_identities, parse_service_rules
from lookaside_server._security.limits import Limits
from lookaside_server._security.tls import DEFAULT_CHECK_INTERVAL, tls_config_from
from lookaside_server._web.http import HttpLimits
from lookaside_server._web.logging import FORMATS
from lookaside_server._xds import MAX_NAMES as XDS_MAX_NAMES

_D = Limits()
_H = HttpLimits()


def add_security_arguments(p: argparse.ArgumentParser) -> None:
    """TLS, access, limit and log-format flags."""
    g = p.add_argument_group("transport security (TLS)")
    env_argument(
        g,
        "--tls-cert",
        env="LB_TLS_CERT",
        metavar="PEM",
        help="server certificate chain; with --tls-key turns TLS on for the gRPC port (xDS "
        "included); re-read when the file changes, no restart needed. An expired, not yet "
        "valid or non-server certificate is refused (at start: exit 2; on rotation: the "
        "current one stays)",
    )
    env_argument(
        g, "--tls-key", env="LB_TLS_KEY", metavar="PEM", help="private key of --tls-cert, unencrypted PEM"
    )
    env_argument(
        g,
        "--tls-client-ca",
        env="LB_TLS_CLIENT_CA",
        metavar="PEM",
        help="CA bundle for client certificates: given = mutual TLS, every client must present a "
        "certificate signed by it",
    )
    env_argument(
        g,
        "--tls-reload-interval",
        env="LB_TLS_RELOAD_INTERVAL",
        type=number(0),
        default=DEFAULT_CHECK_INTERVAL,
        metavar="SECONDS",
        help="look at the TLS files at most this often, on new handshakes",
    )

    a = p.add_argument_group("access control")
    a.add_argument(
        "--allow-service",
        action="append",
        default=None,
        metavar="NS/SVC",
        help="a Service clients may resolve, 'ns/*' for all of a namespace; repeatable or "
        "comma-separated. Once a namespace has a rule only its listed Services may be "
        "resolved; namespaces without rules are unaffected (LB_ALLOW_SERVICES)",
    )
    a.add_argument(
        "--allow-client-identity",
        action="append",
        default=None,
        metavar="GLOB",
        help="client certificate identity allowed to call (SAN URI such as "
        "spiffe://cluster.local/ns/x/sa/y, DNS name or IP; subject CN if no SAN; glob "
        "patterns); repeatable or comma-separated; needs --tls-client-ca. Health checks are "
        "exempt (LB_ALLOW_CLIENT_IDENTITIES; default: any client the CA vouches for)",
    )

    lim = p.add_argument_group("limits")
    env_argument(
        lim,
        "--max-message-bytes",
        env="LB_MAX_MESSAGE_BYTES",
        type=integer(1024),
        default=_D.max_message_bytes,
        help="largest request message accepted; larger ones get RESOURCE_EXHAUSTED",
    )
    env_argument(
        lim,
        "--max-watches",
        env="LB_MAX_WATCHES",
        type=integer(1),
        default=_D.max_watches,
        help="most Watch and xDS streams open at once",
    )
    env_argument(
        lim,
        "--max-watches-per-peer",
        env="LB_MAX_WATCHES_PER_PEER",
        type=integer(1),
        default=_D.max_watches_per_peer,
        help="most Watch and xDS streams open at once per client IP",
    )
    env_argument(
        lim,
        "--max-concurrent-rpcs",
        env="LB_MAX_CONCURRENT_RPCS",
        type=integer(0),
        default=0,
        help="most RPCs in progress, streams included; 0 = no limit",
    )
    env_argument(
        lim,
        "--max-pending-requests",
        env="LB_MAX_PENDING_REQUESTS",
        type=integer(1),
        default=_D.max_pending_requests,
        help="calls queued in grpc core for the server before new ones are cancelled (grpc's own default)",
    )
    # HTTP/2 streams per connection (bounds rapid reset)
    env_argument(
        lim,
        "--max-streams-per-connection",
        env="LB_MAX_STREAMS_PER_CONNECTION",
        type=integer(1),
        default=_D.max_streams_per_connection,
        help="HTTP/2 streams one client connection may have open, reset ones included until the "
        "server has released them; more are refused (REFUSED_STREAM). Bounds HTTP/2 rapid "
        "reset; keep it above the calls one client process runs at once on its channel",
    )
    env_argument(
        lim,
        "--keepalive-time",
        env="LB_KEEPALIVE_TIME",
        type=number(above=0),
        default=_D.keepalive_time,
        help="seconds between the server's keepalive pings",
    )
    env_argument(
        lim,
        "--keepalive-timeout",
        env="LB_KEEPALIVE_TIMEOUT",
        type=number(above=0),
        default=_D.keepalive_timeout,
        help="seconds a ping may go unanswered before the connection is dropped",
    )
    env_argument(
        lim,
        "--min-ping-interval",
        env="LB_MIN_PING_INTERVAL",
        type=number(above=0),
        default=_D.min_ping_interval,
        help="clients may send keepalive pings at most this often, in seconds",
    )
    env_argument(
        lim,
        "--max-connection-idle",
        env="LB_MAX_CONNECTION_IDLE",
        type=number(0),
        default=_D.max_connection_idle or 0,
        help="close connections without RPCs for this many seconds; 0 = never",
    )
    env_argument(
        lim,
        "--max-connection-age",
        env="LB_MAX_CONNECTION_AGE",
        type=number(0),
        default=0,
        help="close connections after this many seconds (streams get 30 s grace; clients "
        "reconnect, e.g. to another replica); 0 = never",
    )
    # ReportLoad caps (_api/load.py LoadLimits)
    env_argument(
        lim,
        "--max-load-reports-per-peer",
        env="LB_MAX_LOAD_REPORTS_PER_PEER",
        type=integer(1),
        default=_D.max_load_reports_per_peer,
        help="most load reports (distinct client ids, over all targets) the server keeps from one "
        "client IP; more get RESOURCE_EXHAUSTED",
    )
    env_argument(
        lim,
        "--max-load-reports-per-target",
        env="LB_MAX_LOAD_REPORTS_PER_TARGET",
        type=integer(1),
        default=_D.max_load_reports_per_target,
        help="most load reports (distinct client ids) the server keeps per target",
    )
    env_argument(
        lim,
        "--max-load-report-endpoints",
        env="LB_MAX_LOAD_REPORT_ENDPOINTS",
        type=integer(1),
        default=_D.max_load_report_endpoints,
        help="most endpoints one load report may name",
    )
    env_argument(
        lim,
        "--max-load-report-rate-per-peer",
        env="LB_MAX_LOAD_REPORT_RATE_PER_PEER",
        type=number(above=0),
        default=_D.max_load_report_rate_per_peer,
        metavar="N",
        help="most ReportLoad calls a second from one client IP (a burst of as many); more get "
        "RESOURCE_EXHAUSTED (clients report once a second per target)",
    )
    # xDS names per ADS stream (_xds XdsOptions.max_names)
    env_argument(
        lim,
        "--xds-max-names",
        env="LB_XDS_MAX_NAMES",
        type=integer(1),
        default=XDS_MAX_NAMES,
        help="most resource names one xDS (ADS) stream may subscribe to, all types together; more "
        "end the stream RESOURCE_EXHAUSTED (a stock gRPC client needs about 4 per target it "
        "dials)",
    )

    # HTTP listener limits (_web/http.py HttpLimits)
    h = p.add_argument_group("HTTP listener (status page, /healthz, /metrics)")
    env_argument(
        h,
        "--http-max-connections",
        env="LB_HTTP_MAX_CONNECTIONS",
        type=integer(1),
        default=_H.max_connections,
        help="most HTTP connections open at once; at the cap a new one replaces the oldest idle or "
        "half-open one (or is closed at once if all are busy); counted as limit hits. Keep it "
        "well under the open-file limit (ulimit -n), which gRPC and the source share",
    )
    env_argument(
        h,
        "--http-header-timeout",
        env="LB_HTTP_HEADER_TIMEOUT",
        type=number(above=0),
        default=_H.header_timeout,
        metavar="SECONDS",
        help="seconds a client has to send a request's headers (from its first byte or from "
        "connecting); slower ones are disconnected",
    )
    env_argument(
        h,
        "--http-idle-timeout",
        env="LB_HTTP_IDLE_TIMEOUT",
        type=number(above=0),
        default=_H.idle_timeout,
        metavar="SECONDS",
        help="close keep-alive HTTP connections idle for this many seconds",
    )
    env_argument(
        h,
        "--http-renders-per-second",
        env="LB_HTTP_RENDERS_PER_SECOND",
        type=number(above=0),
        default=_H.renders_per_second,
        metavar="N",
        help="fresh renders per second of each of /, /status.json and /metrics (a burst of as many); "
        "beyond it a request gets the newest rendering again with an Age header, counted as a limit "
        "hit, so scraping cannot starve gRPC",
    )

    env_argument(
        p,
        "--log-format",
        env="LB_LOG_FORMAT",
        choices=FORMATS,
        type=one_of(FORMATS),
        default="text",
        help="'text' or 'json' (one object per line with time, level, logger, message and, where "
        "known, target and peer)",
    )


def _list(flag: list[str] | None, env: str) -> list[str] | None:
    if flag:
        return flag
    value = os.environ.get(env)
    return [value] if value else None


def security_config(
    args: argparse.Namespace, allow_namespaces: frozenset[str] | None = None
) -> SecurityConfig:
    """TLS and access rules from the flags (``allow_namespaces`` from the source flags); ValueError for
    bad or inconsistent values."""
    tls = tls_config_from(args.tls_cert, args.tls_key, args.tls_client_ca, args.tls_reload_interval)
    identities = parse_identities(_list(args.allow_client_identity, "LB_ALLOW_CLIENT_IDENTITIES"))
    if identities is not None and (tls is None or not tls.mutual):
        raise ValueError(
            "--allow-client-identity (LB_ALLOW_CLIENT_IDENTITIES) needs mutual TLS: "
            "--tls-cert, --tls-key and --tls-client-ca"
        )
    services = parse_service_rules(_list(args.allow_service, "LB_ALLOW_SERVICES")) or None
    return SecurityConfig(
        tls=tls,
        access=AccessConfig(namespaces=allow_namespaces, services=services, client_identities=identities),
    )


def limits_config(args: argparse.Namespace) -> Limits:
    """The gRPC port's limits from the flags (each already range-checked by argparse)."""
    return Limits(
        max_message_bytes=args.max_message_bytes,
        max_watches=args.max_watches,
        max_watches_per_peer=args.max_watches_per_peer,
        max_concurrent_rpcs=args.max_concurrent_rpcs or None,
        max_pending_requests=args.max_pending_requests,
        max_streams_per_connection=args.max_streams_per_connection,
        keepalive_time=args.keepalive_time,
        keepalive_timeout=args.keepalive_timeout,
        min_ping_interval=args.min_ping_interval,
        max_connection_idle=args.max_connection_idle or None,
        max_connection_age=args.max_connection_age or None,
        # ReportLoad caps
        max_load_reports_per_peer=args.max_load_reports_per_peer,
        max_load_reports_per_target=args.max_load_reports_per_target,
        max_load_report_endpoints=args.max_load_report_endpoints,
        max_load_report_rate_per_peer=args.max_load_report_rate_per_peer,
    )


def xds_config(args: argparse.Namespace) -> XdsConfig:
    """``--xds`` and ``--xds-max-names`` as an :class:`XdsConfig` (default resources when the cap is)."""
    if args.xds_max_names == XDS_MAX_NAMES:
        return XdsConfig(enabled=args.xds)
    try:
        from lookaside_server._xds.resources import XdsOptions
    except ImportError:  # no xds-protos: xDS is off anyway (the server says so at start)
        return XdsConfig(enabled=args.xds)
    return XdsConfig(enabled=args.xds, options=XdsOptions(max_names=args.xds_max_names))


def http_limits_config(args: argparse.Namespace) -> HttpLimits:
    """The HTTP listener's limits from the flags."""
    return HttpLimits(
        max_connections=args.http_max_connections,
        header_timeout=args.http_header_timeout,
        idle_timeout=args.http_idle_timeout,
        renders_per_second=args.http_renders_per_second,
    )
