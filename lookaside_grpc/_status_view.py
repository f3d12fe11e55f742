"""The one JSON view of a lookaside server's status: the Status RPC's ``StatusResponse`` as a dict.

The server's ``/status.json`` and ``lookaside status --json`` both produce it with :func:`status_to_dict`,
so the two cannot drift apart.
"""

from __future__ import annotations

import datetime
from typing import Any

from lookaside_grpc._generated import lookaside_pb2


def iso_time(ts: float) -> str:
    """``2026-12-02T04:05:06Z`` (UTC, whole seconds)."""
    return (
        datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def ago(seconds: float) -> str:
    """``42 s ago``, ``3 min ago``, ``2 h ago``, ``5 d ago``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def _endpoint(e: lookaside_pb2.EndpointStatus) -> dict[str, Any]:
    return {
        "ip": e.ip,
        "port": e.port,
        "port_name": e.port_name,
        "zone": e.zone,
        "for_zones": list(e.for_zones),
        "ready": e.ready,
        "serving": e.serving,
        "terminating": e.terminating,
    }


def _target(t: lookaside_pb2.TargetStatus) -> dict[str, Any]:
    return {
        "target": f"{t.service}.{t.namespace}",
        "service": t.service,
        "namespace": t.namespace,
        "exists": t.exists,
        "version": t.version,
        "endpoints_total": len(t.endpoints),
        "endpoints_ready": sum(1 for e in t.endpoints if e.ready),
        "changed_at": t.changed_at,
        "changed_at_iso": iso_time(t.changed_at),
        "watchers": t.watchers,
        "source": dict(sorted(t.source.items())),
        "endpoints": [_endpoint(e) for e in t.endpoints],
    }


def status_to_dict(resp: lookaside_pb2.StatusResponse) -> dict[str, Any]:
    """The JSON form of a ``StatusResponse`` (``/status.json`` and ``lookaside status --json``)."""
    return {
        "server_version": resp.server_version,
        "source": resp.source,
        "generated_at": resp.generated_at,
        "targets": [_target(t) for t in resp.targets],
    }
