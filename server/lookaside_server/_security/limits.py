"""Resource limits of the gRPC port: message size, long-lived streams overall and per peer, keepalive policy.

* ``max_message_bytes`` (default 64 KiB) is ``grpc.max_receive_message_length``: a larger request is refused
  by grpc with RESOURCE_EXHAUSTED before it reaches a handler (every lookaside request is tiny).
* ``max_watches`` / ``max_watches_per_peer``: long-lived streams (``Lookaside/Watch`` and xDS
  ``StreamAggregatedResources``; both hold registry subscriptions) at once, overall and per client IP. One
  more is refused with RESOURCE_EXHAUSTED naming the limit; a slot frees when its stream ends.
* ``max_pending_requests`` (default 1000, grpc's own): calls grpc core queues until the Python server picks
  them up (``grpc.server.max_pending_requests``); beyond it grpc cancels new calls (CANCELLED), randomly up
  to its hard limit (``grpc.server.max_pending_requests_hard_limit``, 3000) and all of them above it.
* ``max_streams_per_connection`` (default 256): HTTP/2 streams one client connection may have open
  (``grpc.max_concurrent_streams``, announced in SETTINGS; clients queue further calls themselves). grpc
  counts a stream until the server has released it, including streams the client already reset, and refuses
  new ones with REFUSED_STREAM beyond the limit (``grpc.http.overload_protection``): that bounds what an
  HTTP/2 rapid reset (HEADERS then RST_STREAM, over and over) can make the server hold. 20,000 resets on one
  connection add about 6 MB at 256 (12 such bursts: about 21 MB), at 1000 about 15 MB (12 bursts: about 50
  MB). The price: a client keeping about this many calls in flight on one connection gets some of them
  refused (UNAVAILABLE) while the server is still releasing finished streams, so keep it above
  ``max_watches_per_peer`` plus the Resolve concurrency of one client process.
* ``max_concurrent_rpcs``: grpc's own cap on RPCs in progress (``grpc.aio.server(maximum_concurrent_rpcs)``,
  streams included); beyond it grpc answers RESOURCE_EXHAUSTED itself. Off by default.
* ``max_load_reports_per_peer`` / ``max_load_reports_per_target`` / ``max_load_report_endpoints``: what
  ReportLoad may store (see ``_api/load.py``); a report beyond a cap gets RESOURCE_EXHAUSTED naming it.
* Keepalive: the server pings every ``keepalive_time`` s and drops connections that do not answer within
  ``keepalive_timeout`` s (so a vanished client's streams and slots are reclaimed); clients may ping at most
  every ``min_ping_interval`` s, also without calls (more often gets them a GOAWAY ``too_many_pings``);
  connections without any RPC for ``max_connection_idle`` s are closed; ``max_connection_age`` (off by
  default) closes connections after that long, giving in-flight calls ``max_connection_age_grace`` s.

Everything here runs on the server's event loop, so the counters need no lock; each per-peer entry is removed
when its last stream ends (memory is bounded by the number of live streams).
"""

from __future__ import annotations

import contextvars
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import unquote

import grpc

from lookaside_server._core.errors import abort

log = logging.getLogger(__name__)

KIB = 1024
MAX_WATCHES = "max_watches"
MAX_WATCHES_PER_PEER = "max_watches_per_peer"
MAX_TARGETS = "max_targets"

_FLAGS = {
    MAX_WATCHES: "--max-watches / LB_MAX_WATCHES",
    MAX_WATCHES_PER_PEER: "--max-watches-per-peer / LB_MAX_WATCHES_PER_PEER",
    MAX_TARGETS: "--max-targets / LB_MAX_TARGETS",
}

#: The recorder of limit hits for the RPC running in this context (set by the server interceptor).
_recorder: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "lookaside_limit_recorder", default=None
)


@dataclass(frozen=True)
class Limits:
    """The server's limits (see the module docstring); times in seconds, None = off."""

    max_message_bytes: int = 64 * KIB
    max_watches: int = 10_000
    max_watches_per_peer: int = 100
    max_concurrent_rpcs: int | None = None
    #: Calls grpc core queues for the Python server before it cancels new ones (grpc's default: 1000).
    max_pending_requests: int = 1000
    #: HTTP/2 streams per client connection (``grpc.max_concurrent_streams``; rapid-reset bound).
    max_streams_per_connection: int = 256
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    min_ping_interval: float = 10.0
    max_connection_idle: float | None = 300.0
    max_connection_age: float | None = None
    max_connection_age_grace: float = 30.0
    #: ReportLoad caps (``_api.load.LoadLimits``): stored reports per client IP and per target, endpoints
    #: per report; beyond them RESOURCE_EXHAUSTED naming the limit.
    max_load_reports_per_peer: int = 64
    max_load_reports_per_target: int = 1000
    max_load_report_endpoints: int = 1000
    #: ReportLoad calls per second from one client IP (a burst of as many); beyond: RESOURCE_EXHAUSTED.
    max_load_report_rate_per_peer: float = 128.0

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1 * KIB:
            raise ValueError("max_message_bytes must be at least 1024")
        if self.max_watches < 1 or self.max_watches_per_peer < 1:
            raise ValueError("max_watches and max_watches_per_peer must be at least 1")
        if self.max_pending_requests < 1:
            raise ValueError("max_pending_requests must be at least 1")
        if self.max_streams_per_connection < 1:
            raise ValueError("max_streams_per_connection must be at least 1")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError("max_concurrent_rpcs must be at least 1 (or None for no limit)")
        for name in ("max_load_reports_per_peer", "max_load_reports_per_target", "max_load_report_endpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.max_load_report_rate_per_peer > 0:
            raise ValueError("max_load_report_rate_per_peer must be positive")

    def server_options(self) -> list[tuple[str, Any]]:
        """The channel arguments of the gRPC server."""
        ms = lambda s: int(s * 1000)  # noqa: E731
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.server.max_pending_requests", self.max_pending_requests),
            # Rapid reset: streams count until released (also reset ones); beyond the limit REFUSED_STREAM.
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.http.overload_protection", 1),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout)),
            # keep pinging quiet Watch streams (by default grpc stops after 2 pings without data)
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_ping_interval)),
            ("grpc.http2.max_ping_strikes", 2),
        ]
        if self.max_connection_idle:
            opts.append(("grpc.max_connection_idle_ms", ms(self.max_connection_idle)))
        if self.max_connection_age:
            opts.append(("grpc.max_connection_age_ms", ms(self.max_connection_age)))
            opts.append(("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace)))
        return opts


def peer_ip(peer: str) -> str:
    """The client IP of a grpc peer string (``ipv4:10.0.0.1:5000``, ``ipv6:[::1]:5000``); else the string."""
    kind, _, rest = peer.partition(":")
    rest = unquote(rest)
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0] if rest.startswith("[") else rest
        return host.strip("[]")
    return kind if kind == "unix" else peer


def set_recorder(recorder: Callable[[str], None] | None) -> None:
    """Route :func:`exhausted`'s counting to ``recorder`` for the current RPC (the server interceptor)."""
    _recorder.set(recorder)


def record_hit(limit: str) -> None:
    """Count a hit of ``limit`` for the current RPC's server (no-op outside one)."""
    recorder = _recorder.get()
    if recorder is not None:
        try:
            recorder(limit)
        except Exception:  # noqa: BLE001
            log.exception("counting a limit hit failed")


async def exhausted(context: grpc.aio.ServicerContext, limit: str, message: str) -> NoReturn:
    """Count ``limit`` as hit and end the RPC with RESOURCE_EXHAUSTED and ``message``."""
    record_hit(limit)
    log.warning("limit %s reached: %s", limit, message)
    await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, message)


class StreamSlots:
    """Counts the long-lived streams open now, overall, per peer IP and per kind (``watch``, ``xds``)."""

    def __init__(self, max_total: int, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.total = 0
        self._per_peer: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()

    def acquire(self, peer: str, kind: str) -> tuple[str, str] | None:
        """Take a slot for a stream from ``peer``; on refusal return (limit, message) and take nothing."""
        if self.total >= self.max_total:
            return MAX_WATCHES, (
                f"too many watch streams: this server already serves its maximum of "
                f"{self.max_total} Watch/xDS streams ({_FLAGS[MAX_WATCHES]})"
            )
        if self._per_peer[peer] >= self.max_per_peer:
            return MAX_WATCHES_PER_PEER, (
                f"too many watch streams from {peer}: at most {self.max_per_peer} Watch/xDS streams per "
                f"client IP ({_FLAGS[MAX_WATCHES_PER_PEER]})"
            )
        self.total += 1
        self._per_peer[peer] += 1
        self.by_kind[kind] += 1
        return None

    def release(self, peer: str, kind: str) -> None:
        """Give back the slot of a stream that ended."""
        self.total -= 1
        self.by_kind[kind] -= 1
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]

    def peers(self) -> int:
        """How many distinct peers hold a slot."""
        return len(self._per_peer)
