"""The lookaside wire protocol (``proto/lookaside.proto``): messages, stub and servicer base, and the one
target grammar (``service.namespace[.svc[.cluster.local]][:port]``) that names Services on the wire.

This module is the one seam between the client plugin set and the lookaside server; both import it.
"""

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
from lookaside_grpc._target import InvalidTarget, Target, canonical_port

#: The full name of the service, for health checks and reflection.
SERVICE_NAME: str = _pb2.DESCRIPTOR.services_by_name["Lookaside"].full_name
#: The file descriptor of ``lookaside.proto``.
DESCRIPTOR = _pb2.DESCRIPTOR

RouterType = Request.RouterType
RANDOM: int = Request.RANDOM
ROUNDROBIN: int = Request.ROUNDROBIN
LEAST_REQUEST: int = Request.LEAST_REQUEST
PEAK_EWMA: int = Request.PEAK_EWMA
WEIGHTED: int = Request.WEIGHTED
#: Router types the server answers from the load clients report (ReportLoad).
LOAD_ROUTERS: frozenset[int] = frozenset({LEAST_REQUEST, PEAK_EWMA, WEIGHTED})

__all__ = [
    "DESCRIPTOR",
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
    "canonical_port",
]
