"""The lookaside wire protocol (``proto/lookaside/v1/lookaside.proto``): messages, stub and servicer base,
the one target grammar (``service.namespace[.svc[.cluster.local]][:port]``) that names Services on the wire,
and the one JSON view of the Status RPC's answer (:func:`status_to_dict`).

This module is the one seam between the client plugin set and the lookaside server; both import it.

The messages live in a descriptor pool of their own (:data:`POOL`), not protobuf's default pool, so that an
application may also hold stubs generated from the original ``lookaside.proto``, which define the same
symbols (package ``lookaside``). A process that wants the file in the default pool as well (a server offering
reflection) calls :func:`add_to_default_pool`.
"""

from collections.abc import Sequence as _Sequence
from typing import TypeVar as _TypeVar

from google.protobuf import descriptor_pool as _descriptor_pool

from lookaside_grpc._generated import lookaside_pb2 as _pb2
from lookaside_grpc._generated.lookaside_pb2 import (
    Endpoint,
    EndpointLoad,
    EndpointSet,
    EndpointStatus,
    LoadReport,
    LoadReportAck,
    Request,
    Response,
    StatusRequest,
    StatusResponse,
    TargetStatus,
    WatchRequest,
)
from lookaside_grpc._generated.lookaside_pb2_grpc import (
    LookasideServicer,
    LookasideStub,
    add_LookasideServicer_to_server,
)
from lookaside_grpc._status_view import ago, iso_time, status_to_dict
from lookaside_grpc._target import InvalidTarget, Target, canonical_port
from lookaside_grpc._weights import weighted_schedule

_Zoned = _TypeVar("_Zoned")  # anything with ``zone`` and ``for_zones`` (client or server endpoints)

#: The full name of the service, for health checks and reflection.
SERVICE_NAME: str = _pb2.DESCRIPTOR.services_by_name["Lookaside"].full_name
#: The file descriptor of ``lookaside/v1/lookaside.proto``.
DESCRIPTOR = _pb2.DESCRIPTOR
#: The descriptor pool that holds it (private to lookaside_grpc).
POOL: _descriptor_pool.DescriptorPool = _pb2.POOL


def add_to_default_pool() -> bool:
    """Also register ``lookaside/v1/lookaside.proto`` in protobuf's default descriptor pool, where server
    reflection looks (``grpcurl describe lookaside.Lookaside``). Returns False, changing nothing, when the
    default pool already defines the ``lookaside`` symbols from another file (the original
    ``lookaside.proto``); True when the file is (now) there."""
    pool = _descriptor_pool.Default()
    try:
        pool.FindFileByName(DESCRIPTOR.name)
        return True
    except KeyError:
        pass
    try:
        pool.AddSerializedFile(DESCRIPTOR.serialized_pb)
    except (TypeError, ValueError):  # "duplicate symbol" (TypeError from upb, ValueError in pure Python)
        return False
    return True


RouterType = Request.RouterType
RANDOM: int = Request.RANDOM
ROUNDROBIN: int = Request.ROUNDROBIN
LEAST_REQUEST: int = Request.LEAST_REQUEST
PEAK_EWMA: int = Request.PEAK_EWMA
WEIGHTED: int = Request.WEIGHTED
#: Router types the server answers from the load clients report (ReportLoad).
LOAD_ROUTERS: frozenset[int] = frozenset({LEAST_REQUEST, PEAK_EWMA, WEIGHTED})


def zone_split(
    endpoints: _Sequence[_Zoned], zone: str
) -> tuple[tuple[_Zoned, ...], tuple[_Zoned, ...], float]:
    """(local, spill-over, fraction kept local) for a client in ``zone``: the client's zone-aware rule
    (``_policies.zone_split``), shared with the server's zone-aware xDS endpoints. Imported on first use
    (the policies import this module)."""
    from lookaside_grpc._policies import zone_split as split

    return split(endpoints, zone)  # type: ignore[arg-type, return-value]


__all__ = [
    "DESCRIPTOR",
    "POOL",
    "Endpoint",
    "EndpointLoad",
    "EndpointSet",
    "EndpointStatus",
    "InvalidTarget",
    "LEAST_REQUEST",
    "LOAD_ROUTERS",
    "LoadReport",
    "LoadReportAck",
    "LookasideServicer",
    "LookasideStub",
    "PEAK_EWMA",
    "RANDOM",
    "ROUNDROBIN",
    "Request",
    "Response",
    "RouterType",
    "SERVICE_NAME",
    "StatusRequest",
    "StatusResponse",
    "Target",
    "TargetStatus",
    "WEIGHTED",
    "WatchRequest",
    "add_LookasideServicer_to_server",
    "add_to_default_pool",
    "ago",
    "canonical_port",
    "weighted_schedule",
    "zone_split",
    "iso_time",
    "status_to_dict",
]
