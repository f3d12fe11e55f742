"""xDS resource names and the Envoy v3 resources the lookaside serves for them (built with ``xds-protos``).

Naming scheme: a gRPC client dials ``xds:///<target>``, any spelling of the one target grammar
``service.namespace[.svc[.cluster.local]][:port]`` (:class:`lookaside_grpc.protocol.Target`; port by name or
number, without one the Service's first port as for Resolve). A stock client subscribes to the Listener by
the exact name it dialled, so the Listener carries that name (one Listener per spelling, a few hundred bytes);
everything behind it is named canonically, ``str(Target.parse(name))`` (``greet.default:5001`` for
``greet.default.svc:05001``): the Listener routes to the RouteConfiguration and Cluster of the canonical name,
whose ClusterLoadAssignment has that name too. The server chooses those names, so a client asks for them only
canonically; every spelling of one (target, port) shares one Cluster and one ClusterLoadAssignment, encoded
once per endpoint version (see ``stream.ResourceCache``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, duration_pb2, message, wrappers_pb2

from lookaside_server._core.model import BackendEndpoint, Endpoints
from lookaside_server._xds import MAX_NAMES

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = (LISTENER, ROUTE, CLUSTER, ENDPOINTS)
#: Short names for logs.
TYPE_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINTS: "EDS"}

ROUTER_FILTER = "envoy.filters.http.router"

#: Default of :attr:`XdsOptions.max_queued_requests`.
MAX_QUEUED_REQUESTS = 8


def _default_outlier_detection() -> outlier_detection_pb2.OutlierDetection:
    # gRPC implements only success-rate and failure-percentage ejection (gRFC A50); consecutive_5xx and
    # the gateway-failure fields are ignored by gRPC clients, so they are not set. Success-rate ejection with
    # Envoy's stock thresholds: it needs 5+ endpoints with 100+ calls each per 10 s interval and ejects only
    # clear statistical outliers (mean - 1.9 stdev), at most 10 % of endpoints (at least one), for 30 s
    # growing per repeat. Failure-percentage ejection stays off (enforcing 0): it would count application
    # errors (any non-OK status) against an endpoint.
    return outlier_detection_pb2.OutlierDetection(
        interval=duration_pb2.Duration(seconds=10),
        base_ejection_time=duration_pb2.Duration(seconds=30),
        max_ejection_time=duration_pb2.Duration(seconds=300),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=10),
        enforcing_success_rate=wrappers_pb2.UInt32Value(value=100),
        success_rate_minimum_hosts=wrappers_pb2.UInt32Value(value=5),
        success_rate_request_volume=wrappers_pb2.UInt32Value(value=100),
        success_rate_stdev_factor=wrappers_pb2.UInt32Value(value=1900),
        enforcing_failure_percentage=wrappers_pb2.UInt32Value(value=0),
    )


def weight_one(endpoint: BackendEndpoint) -> int:
    """The default endpoint weight: every endpoint gets the same share."""
    return 1


@dataclass(frozen=True)
class XdsOptions:
    """How the xDS resources are shaped."""

    #: Serve the RouteConfiguration over RDS instead of inline in the Listener (one more round trip).
    rds: bool = False
    #: Outlier detection for every Cluster; None = none.
    outlier_detection: outlier_detection_pb2.OutlierDetection | None = field(
        default_factory=_default_outlier_detection
    )
    #: Weight of each endpoint (its locality's load_balancing_weight, >= 1) when the target has no load
    #: weights (or ``load_weights`` is off).
    weight: Callable[[BackendEndpoint], int] = weight_one
    #: Use the weights the server derives from client load reports (ReportLoad, ``_load.LoadBoard``) as the
    #: locality weights of targets that have them; a meaningful change pushes a new ClusterLoadAssignment.
    load_weights: bool = True
    #: Seconds between new looks at subscribed names whose target does not exist (yet).
    retry_interval: float = 5.0
    #: Most distinct resource names one ADS stream may subscribe to, all types together (and so one request):
    #: more end the stream RESOURCE_EXHAUSTED naming the limit. A stock gRPC client needs about four per
    #: dialled target (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment).
    max_names: int = MAX_NAMES
    #: Requests of one stream received but not handled yet; while that many wait, the stream is not read
    #: (HTTP/2 flow control then holds the client back) instead of buffering what a client sends without
    #: reading the answers.
    max_queued_requests: int = MAX_QUEUED_REQUESTS
    #: Seconds between two log lines of one kind (NACK, unknown type, unknown name, ...) about one client IP;
    #: the ones in between are counted (``lookaside_xds_rejects_total``) and summed up in the next line.
    log_interval: float = 30.0

    def __post_init__(self) -> None:
        if self.max_names < 1:
            raise ValueError("max_names must be at least 1")
        if self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be at least 1")


def pack(msg: message.Message) -> any_pb2.Any:
    """``msg`` in an Any."""
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def route_configuration(name: str) -> route_pb2.RouteConfiguration:
    """One virtual host for every domain, routing every path to the cluster ``name``."""
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=name,
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix=""),
                        route=route_components_pb2.RouteAction(cluster=name),
                    )
                ],
            )
        ],
    )


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def listener(name: str, options: XdsOptions, canonical: str | None = None) -> listener_pb2.Listener:
    """An API listener named ``name`` (the name the client dialled) whose HttpConnectionManager routes
    (inline or via RDS) to the cluster ``canonical`` (default: ``name``) and ends with the router."""
    canonical = name if canonical is None else canonical
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=canonical,
        http_filters=[hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router()))],
    )
    if options.rds:
        hcm.rds.CopyFrom(hcm_pb2.Rds(config_source=_ads(), route_config_name=canonical))
    else:
        hcm.route_config.CopyFrom(route_configuration(canonical))
    return listener_pb2.Listener(name=name, api_listener=api_listener_pb2.ApiListener(api_listener=pack(hcm)))


def cluster(name: str, options: XdsOptions) -> cluster_pb2.Cluster:
    """An EDS cluster (endpoints over ADS under the same name), round robin, with the outlier detection."""
    out = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=name),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    if options.outlier_detection is not None:
        out.outlier_detection.CopyFrom(options.outlier_detection)
    return out


def endpoint_weights(
    endpoints: Endpoints, options: XdsOptions, load: Mapping[tuple[str, int], int] | None = None
) -> list[int]:
    """The locality weight of each endpoint, every one an integer >= 1.

    With ``load`` (the published load weights of the target by ``(ip, port)``, see ``_load.LoadBoard``):
    those weights; an endpoint nobody reported on yet (a new pod) gets the mean of the known ones, as the
    client's weighted policy counts it, so it is neither starved nor flooded. Without load weights:
    ``options.weight`` (1 each by default).
    """
    if load and options.load_weights:
        known = [load[(e.ip, e.port)] for e in endpoints if (e.ip, e.port) in load]
        if known:
            mean = max(1, round(sum(known) / len(known)))
            return [max(1, int(load.get((e.ip, e.port), mean))) for e in endpoints]
    return [max(1, int(options.weight(e))) for e in endpoints]


def load_assignment(
    name: str, endpoints: Endpoints, options: XdsOptions, load: Mapping[tuple[str, int], int] | None = None
) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints as ONE LOCALITY EACH, weighted by :func:`endpoint_weights` (the load weights of the
    target when clients report load, else ``options.weight``).

    gRPC's ROUND_ROBIN ignores per-endpoint weights but honours locality weights (weighted_target), so a
    locality per endpoint is how endpoint weights take effect; a locality without a weight would be dropped.
    The sub-zone is ``ip:port`` so localities are distinct; the zone is the endpoint's topology zone.
    """
    weights = endpoint_weights(endpoints, options, load)
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(zone=e.zone, sub_zone=_host_port(e)),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=w),
                priority=0,
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(address=e.ip, port_value=e.port)
                            )
                        ),
                        health_status=health_check_pb2.HEALTHY,
                    )
                ],
            )
            for e, w in zip(endpoints, weights, strict=True)
        ],
    )


def _host_port(e: BackendEndpoint) -> str:
    return f"[{e.ip}]:{e.port}" if ":" in e.ip else f"{e.ip}:{e.port}"
