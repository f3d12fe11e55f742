"""xDS resource names and the Envoy v3 resources the lookaside serves for them (built with ``xds-protos``).

Naming scheme: a gRPC client dials ``xds:///<target>``, any spelling of the one target grammar
``service.namespace[.svc[.cluster.local]][:port]`` (:class:`lookaside_grpc.protocol.Target`; port by name or
number, without one the Service's first port as for Resolve). A stock client subscribes to the Listener by
the exact name it dialled, so the Listener carries that name (one Listener per spelling, a few hundred bytes);
everything behind it is named canonically, ``str(Target.parse(name))`` (``greet.default:5001`` for
``greet.default.svc:05001``): the Listener routes to the RouteConfiguration and Cluster of the canonical name,
whose ClusterLoadAssignment has that name too. The server chooses those names, so a client asks for them only
canonically; every spelling of one (target, port) shares one Cluster and one ClusterLoadAssignment, encoded
once per endpoint version (see ``stream.ResourceCache``) and client zone.

Routing: the ClusterLoadAssignment of a client in a zone puts its zone first (:func:`placements`, priorities
and spill-over weights by the client library's zone rule); a target with a hash header gets a RING_HASH
Cluster and a route hashing that header; ``lb_policy="wrr"`` asks for gRPC's client_side_weighted_round_robin
and groups the endpoints into one locality per zone, where WRR can weigh them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, extension_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
    client_side_weighted_round_robin_pb2 as cswrr_pb2,
)
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from google.protobuf import any_pb2, duration_pb2, message, wrappers_pb2

from lookaside_grpc.protocol import zone_split
from lookaside_server._core.model import BackendEndpoint, Endpoints, Target
from lookaside_server._xds import (
    HASH_ALL,
    LB_POLICIES,
    MAX_NAMES,
    MAX_ZONES,
    ROUND_ROBIN,
    WRR,
    check_hash_header,
)

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
#: Bytes of xDS responses being built and written at once, all streams together (see ``XdsOptions``).
MAX_SENDING_BYTES = 32 << 20


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
    #: Zone-aware endpoints: most distinct client zones (bootstrap ``node.locality.zone``) served their own
    #: ClusterLoadAssignment at once; a stream naming another zone gets the zone-unaware one (logged,
    #: counted as the limit ``xds_max_zones``). 0 = zones are ignored.
    max_zones: int = MAX_ZONES
    #: Endpoint-picking policy of the Clusters without a hash header: ``round_robin`` (one locality per
    #: endpoint, so locality weights carry the endpoint weights) or ``wrr`` (gRPC's
    #: client_side_weighted_round_robin over the backends' ORCA reports, endpoints grouped per zone).
    lb_policy: str = ROUND_ROBIN
    #: Consistent hashing (RING_HASH + a route hash policy on a request header): header name by
    #: ``namespace/service``, or :data:`HASH_ALL` (``*``) for every target without an entry of its own.
    hash_headers: Mapping[str, str] = field(default_factory=dict)
    #: client_side_weighted_round_robin's ``blackout_period`` (seconds an endpoint must report before its
    #: weight counts) and ``weight_update_period``; None = gRPC's defaults (10 s, 1 s).
    wrr_blackout_period: float | None = None
    wrr_weight_update_period: float | None = None
    #: Bytes of responses being built and written at once, all streams together. A response is a copy of
    #: its shared resources per stream, so a change of a large target reaching thousands of streams at once
    #: would otherwise hold a copy per stream (10,000 streams of a 5,000-endpoint target: about 2.5 GB); over
    #: the budget, streams wait their turn (one response bigger than the budget is sent alone).
    max_sending_bytes: int = MAX_SENDING_BYTES

    def __post_init__(self) -> None:
        if self.max_sending_bytes < 1:
            raise ValueError("max_sending_bytes must be at least 1")
        if self.max_names < 1:
            raise ValueError("max_names must be at least 1")
        if self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be at least 1")
        if self.max_zones < 0:
            raise ValueError("max_zones must be at least 0")
        if self.lb_policy not in LB_POLICIES:
            raise ValueError(f"lb_policy must be one of {', '.join(LB_POLICIES)}, not {self.lb_policy!r}")
        for key, header in self.hash_headers.items():
            check_hash_header(header)
            if key != HASH_ALL:
                ns, _, svc = key.partition("/")
                if not ns or not svc:
                    raise ValueError(f"hash header target {key!r}: expected namespace/service or {HASH_ALL}")
        for name in ("wrr_blackout_period", "wrr_weight_update_period"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 86400:
                raise ValueError(f"{name} must be within [0, 86400) seconds")

    def hash_header(self, target: Target) -> str | None:
        """The request header whose value picks the backend of ``target`` (consistent hashing), if any."""
        if not self.hash_headers:
            return None
        return self.hash_headers.get(f"{target.namespace}/{target.service}", self.hash_headers.get(HASH_ALL))

    def grouped(self, target: Target) -> bool:
        """Whether ``target``'s endpoints are grouped into one locality per zone (WRR) rather than one
        locality each."""
        return self.lb_policy == WRR and self.hash_header(target) is None


def pack(msg: message.Message) -> any_pb2.Any:
    """``msg`` in an Any."""
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def route_configuration(name: str, hash_header: str | None = None) -> route_pb2.RouteConfiguration:
    """One virtual host for every domain, routing every path to the cluster ``name``; with ``hash_header``
    the route hashes that request header (for the cluster's RING_HASH; a call without it gets a random
    hash, as in gRPC)."""
    action = route_components_pb2.RouteAction(cluster=name)
    if hash_header is not None:
        action.hash_policy.append(
            route_components_pb2.RouteAction.HashPolicy(
                header=route_components_pb2.RouteAction.HashPolicy.Header(header_name=hash_header)
            )
        )
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=name,
                domains=["*"],
                routes=[
                    route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix=""), route=action)
                ],
            )
        ],
    )


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def listener(
    name: str, options: XdsOptions, canonical: str | None = None, hash_header: str | None = None
) -> listener_pb2.Listener:
    """An API listener named ``name`` (the name the client dialled) whose HttpConnectionManager routes
    (inline or via RDS) to the cluster ``canonical`` (default: ``name``) and ends with the router; an inline
    route hashes ``hash_header`` (see :func:`route_configuration`)."""
    canonical = name if canonical is None else canonical
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=canonical,
        http_filters=[hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router()))],
    )
    if options.rds:
        hcm.rds.CopyFrom(hcm_pb2.Rds(config_source=_ads(), route_config_name=canonical))
    else:
        hcm.route_config.CopyFrom(route_configuration(canonical, hash_header))
    return listener_pb2.Listener(name=name, api_listener=api_listener_pb2.ApiListener(api_listener=pack(hcm)))


def cluster(name: str, options: XdsOptions, hash_header: str | None = None) -> cluster_pb2.Cluster:
    """An EDS cluster (endpoints over ADS under the same name) with the outlier detection: RING_HASH (xxHash,
    as gRPC requires) when the target hashes a header, else round robin, or with ``options.lb_policy`` wrr
    gRPC's client_side_weighted_round_robin under wrr_locality (round robin as the fallback for clients
    without it)."""
    out = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=name),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    if hash_header is not None:
        out.lb_policy = cluster_pb2.Cluster.RING_HASH
        out.ring_hash_lb_config.CopyFrom(
            cluster_pb2.Cluster.RingHashLbConfig(
                minimum_ring_size=wrappers_pb2.UInt64Value(value=1024),
                hash_function=cluster_pb2.Cluster.RingHashLbConfig.XX_HASH,
            )
        )
    elif options.lb_policy == WRR:
        out.load_balancing_policy.CopyFrom(_wrr_policy(options))
    if options.outlier_detection is not None:
        out.outlier_detection.CopyFrom(options.outlier_detection)
    return out


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def _wrr_policy(options: XdsOptions) -> cluster_pb2.LoadBalancingPolicy:
    """wrr_locality { client_side_weighted_round_robin, else round_robin } (gRFC A52/A58): the locality
    weights pick a locality, WRR picks within it by the ORCA-reported weights."""
    wrr = cswrr_pb2.ClientSideWeightedRoundRobin()
    if options.wrr_blackout_period is not None:
        wrr.blackout_period.CopyFrom(_duration(options.wrr_blackout_period))
    if options.wrr_weight_update_period is not None:
        wrr.weight_update_period.CopyFrom(_duration(options.wrr_weight_update_period))
    endpoint_picking = cluster_pb2.LoadBalancingPolicy(
        policies=[
            _policy("envoy.load_balancing_policies.client_side_weighted_round_robin", wrr),
            _policy("envoy.load_balancing_policies.round_robin", round_robin_pb2.RoundRobin()),
        ]
    )
    return cluster_pb2.LoadBalancingPolicy(
        policies=[
            _policy(
                "envoy.load_balancing_policies.wrr_locality",
                wrr_locality_pb2.WrrLocality(endpoint_picking_policy=endpoint_picking),
            )
        ]
    )


def _policy(name: str, config: message.Message) -> cluster_pb2.LoadBalancingPolicy.Policy:
    return cluster_pb2.LoadBalancingPolicy.Policy(
        typed_extension_config=extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(config))
    )


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


#: Total locality weight of priority 0 when the client's zone keeps only part of its calls (the local and
#: spill-over shares are scaled to it; well within gRPC's uint32 limit on a priority's weights).
ZONE_WEIGHT_TOTAL = 1_000_000


@dataclass(frozen=True)
class Placement:
    """Where one endpoint goes in a ClusterLoadAssignment: its priority and weight."""

    endpoint: BackendEndpoint
    priority: int
    weight: int


def placements(endpoints: Endpoints, weights: list[int], zone: str = "") -> tuple[list[Placement], bool]:
    """Each endpoint's priority and weight for a client in ``zone``, and whether the placement is zone-aware,
    by the client library's zone rule (:func:`lookaside_grpc.protocol.zone_split`: EndpointSlice hints,
    else Envoy's zone-aware rule).

    No zone, or zones ignored (fewer than 6 endpoints, none local): all at priority 0 with ``weights``,
    today's encoding. Otherwise the local endpoints are priority 0 and the other zones priority 1 (gRPC's
    priority policy fails over to it only when priority 0 has no READY endpoint). When the local zone has
    less than its share of the endpoints, the spill-over endpoints join priority 0 too, weighted so that
    the local ones carry exactly the kept fraction of the calls (gRPC's weighted_target picks a locality
    by weight): the client keeps ``keep`` of its calls local and no local endpoint gets more than an even
    share.
    """
    everything = [Placement(e, 0, w) for e, w in zip(endpoints, weights, strict=True)]
    if not zone:
        return everything, False
    local, spill, keep = zone_split(endpoints, zone)
    if len(local) == len(endpoints):
        return everything, False
    local_ids = {id(e) for e in local}
    spill_ids = {id(e) for e in spill} if keep < 1.0 else set()
    local_total = sum(w for e, w in zip(endpoints, weights, strict=True) if id(e) in local_ids)
    spill_total = sum(w for e, w in zip(endpoints, weights, strict=True) if id(e) in spill_ids)
    out = []
    for e, w in zip(endpoints, weights, strict=True):
        if id(e) in local_ids:
            out.append(Placement(e, 0, _scaled(w, keep, local_total) if spill_ids else w))
        elif id(e) in spill_ids:
            out.append(Placement(e, 0, _scaled(w, 1.0 - keep, spill_total)))
        else:
            out.append(Placement(e, 1, w))
    return out, True


def _scaled(weight: int, share: float, group_total: int) -> int:
    return max(1, round(ZONE_WEIGHT_TOTAL * share * weight / group_total))


def load_assignment(
    name: str,
    endpoints: Endpoints,
    options: XdsOptions,
    load: Mapping[tuple[str, int], int] | None = None,
    zone: str = "",
    grouped: bool = False,
) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints as ONE LOCALITY EACH, weighted by :func:`endpoint_weights` (the load weights of the
    target when clients report load, else ``options.weight``), placed in priorities for a client in ``zone``
    (:func:`placements`).

    gRPC's ROUND_ROBIN ignores per-endpoint weights but honours locality weights (weighted_target), so a
    locality per endpoint is how endpoint weights take effect; a locality without a weight would be dropped.
    The sub-zone is ``ip:port`` so localities are distinct; the zone is the endpoint's topology zone.

    ``grouped`` (client_side_weighted_round_robin): one locality per (priority, zone), or one per priority
    for a client without zone-aware placement, weighted by the sum of its endpoints' weights: WRR picks
    among the endpoints of one locality, so with a locality each its ORCA weights would change nothing.
    """
    placed, zoned = placements(endpoints, endpoint_weights(endpoints, options, load), zone)
    if not grouped:
        localities = [
            _locality(
                base_pb2.Locality(zone=p.endpoint.zone, sub_zone=_host_port(p.endpoint)), p.priority, [p]
            )
            for p in placed
        ]
    else:
        groups: dict[tuple[int, str], list[Placement]] = {}
        for p in placed:
            groups.setdefault((p.priority, p.endpoint.zone if zoned else ""), []).append(p)
        localities = [
            _locality(base_pb2.Locality(zone=z, sub_zone=f"p{priority}"), priority, members)
            for (priority, z), members in sorted(groups.items())
        ]
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=localities)


def _locality(
    locality: base_pb2.Locality, priority: int, members: list[Placement]
) -> endpoint_components_pb2.LocalityLbEndpoints:
    return endpoint_components_pb2.LocalityLbEndpoints(
        locality=locality,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=min(sum(p.weight for p in members), 2**32 - 1)),
        priority=priority,
        lb_endpoints=[
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(
                        socket_address=address_pb2.SocketAddress(
                            address=p.endpoint.ip, port_value=p.endpoint.port
                        )
                    )
                ),
                health_status=health_check_pb2.HEALTHY,
                **(
                    {"load_balancing_weight": wrappers_pb2.UInt32Value(value=p.weight)}
                    if len(members) > 1
                    else {}
                ),
            )
            for p in members
        ],
    )


def _host_port(e: BackendEndpoint) -> str:
    return f"[{e.ip}]:{e.port}" if ":" in e.ip else f"{e.ip}:{e.port}"
