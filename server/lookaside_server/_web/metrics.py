"""Prometheus metrics of one server (``/metrics`` on the HTTP listener), in a registry of its own.

Counted as things happen (by the server interceptor, the access policy and the limits):

* the standard gRPC server series of go-grpc-prometheus (what the usual Grafana dashboards and alerting
  rules query), labelled ``grpc_type`` (``unary``, ``server_stream``, ``client_stream``, ``bidi_stream``),
  ``grpc_service`` and ``grpc_method``:

  - ``grpc_server_started_total``: RPCs started (a stream when it starts);
  - ``grpc_server_handled_total{...,grpc_code}``: RPCs finished (a stream when it ends), by status code
    spelled as grpc-go does (``OK``, ``NotFound``, ``Canceled``, ``ResourceExhausted``, ...);
  - ``grpc_server_handling_seconds``: a histogram of the time from start to finish, of every type (a
    stream's lifetime lands in the upper buckets: dashboards show latency for ``grpc_type="unary"``);
  - ``grpc_server_msg_received_total``, ``grpc_server_msg_sent_total``: messages of each RPC;

* ``lookaside_rpcs_total{grpc_service,grpc_method,grpc_code}``: finished RPCs by status code as Python's
  grpc spells it (``NOT_FOUND``), kept for existing dashboards: prefer ``grpc_server_handled_total``;
* ``lookaside_rpc_duration_seconds{grpc_service,grpc_method}``: latency of unary-response RPCs (Resolve,
  Status, ReportLoad, health checks), kept likewise: prefer ``grpc_server_handling_seconds``;
* ``lookaside_access_denied_total{reason}``: denials by ``namespace``, ``service`` or ``identity``;
* ``lookaside_limit_hits_total{limit}``: ``max_watches``, ``max_watches_per_peer``, ``max_targets``,
  ``xds_max_names`` (an xDS stream subscribing to more names than ``--xds-max-names``), ``xds_max_zones``
  (an xDS client zone beyond ``--xds-max-zones``: served the zone-unaware encoding),
  ``max_load_reports_per_peer``, ``max_load_reports_per_target``, ``max_load_report_endpoints``,
  ``max_load_report_rate_per_peer`` (ReportLoad),
  and of the HTTP listener ``http_max_connections`` (a connection closed at the cap),
  ``http_header_timeout`` (request headers too slow) and ``http_render_budget`` (answered with an earlier
  rendering, or 429) (grpc refuses oversize messages, RPCs above
  ``--max-concurrent-rpcs`` and streams above ``--max-streams-per-connection`` itself: not counted here).
* ``lookaside_xds_rejects_total{reason}``: xDS request parts not served (``nack``, ``unknown_type``,
  ``unknown_name``, ``invalid_name``, ``not_found``, ``denied``, ``too_many_names``, ``invalid_request``).

Read at scrape time (no double bookkeeping; series of forgotten targets simply disappear):

* ``lookaside_streams{kind}``: open Watch (``watch``) and xDS (``xds``) streams;
* ``lookaside_targets``: targets tracked (subscribed in the source);
* ``lookaside_target_endpoints{target}``, ``lookaside_target_ready_endpoints{target}``,
  ``lookaside_target_watchers{target}``, ``lookaside_target_version{target}``;
* ``lookaside_kubernetes_watch_restarts_total{target}``, ``lookaside_kubernetes_watch_errors_total{target}``
  (Kubernetes sources: from the source's per-target watch state);
* ``lookaside_http_connections``: open connections of the HTTP listener;
* ``lookaside_tls_reloads_total``, ``lookaside_tls_reload_errors_total`` (with TLS);
* plus the ``process_*``, ``python_info`` and ``python_gc_*`` collectors.
"""

from __future__ import annotations

import asyncio
import contextvars
import gzip
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    exposition,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lookaside_server._api.load import (
    MAX_LOAD_REPORT_ENDPOINTS,
    MAX_LOAD_REPORT_RATE,
    MAX_LOAD_REPORTS_PER_PEER,
    MAX_LOAD_REPORTS_PER_TARGET,
)
from lookaside_server._core.registry import Registry
from lookaside_server._security.limits import MAX_TARGETS, MAX_WATCHES, MAX_WATCHES_PER_PEER, StreamSlots
from lookaside_server._web.http import HTTP_LIMITS, HttpRequest, HttpResponse, HttpServer
from lookaside_server._web.render_budget import RenderBudget

log = logging.getLogger(__name__)

#: The classic text format every Prometheus version reads (newer clients default to announcing 1.0.0).
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

#: Resolve is an in-memory pick: most answers take well under a millisecond.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
STREAM_KINDS = ("watch", "xds")
#: The limit labels of ``--xds-max-names`` and ``--xds-max-zones`` (``_xds.stream.MAX_NAMES_LIMIT`` and
#: ``MAX_ZONES_LIMIT``; that module needs the optional xds-protos package, so the names are repeated here to
#: show the series at 0 from the start).
XDS_MAX_NAMES = "xds_max_names"
XDS_MAX_ZONES = "xds_max_zones"

#: ``grpc_server_handling_seconds``: the sub-millisecond buckets of Resolve, then up to an hour for the
#: lifetime of Watch and xDS streams.
HANDLING_BUCKETS = (*LATENCY_BUCKETS, 10.0, 60.0, 600.0, 3600.0)

#: ``grpc_type`` by the attribute of ``grpc.RpcMethodHandler`` that holds the behaviour.
GRPC_TYPES = {
    "unary_unary": "unary",
    "unary_stream": "server_stream",
    "stream_unary": "client_stream",
    "stream_stream": "bidi_stream",
}


def _go_code(name: str) -> str:
    """grpc-go's spelling of a status code (``codes.Code.String()``), which go-grpc-prometheus puts in
    ``grpc_code``: ``NOT_FOUND`` -> ``NotFound``, ``CANCELLED`` -> ``Canceled``, ``OK`` stays."""
    if name in ("OK", "CANCELLED"):
        return "OK" if name == "OK" else "Canceled"
    return "".join(word.capitalize() for word in name.split("_"))


#: Python's status code name (``grpc.StatusCode.NOT_FOUND.name``) -> grpc-go's (``NotFound``).
GO_CODES = {c.name: _go_code(c.name) for c in grpc.StatusCode}


class MethodMetrics:
    """The series of one method (children resolved once, so counting an RPC is a few increments)."""

    __slots__ = (
        "_handled",
        "_handled_children",
        "_legacy",
        "_legacy_children",
        "duration",
        "labels",
        "received",
        "seconds",
        "sent",
        "started",
    )

    def __init__(self, metrics: ServerMetrics, grpc_type: str, service: str, method: str) -> None:
        self.labels = (grpc_type, service, method)
        self.started = metrics.started.labels(*self.labels)
        self.received = metrics.msg_received.labels(*self.labels)
        self.sent = metrics.msg_sent.labels(*self.labels)
        self.seconds = metrics.handling.labels(*self.labels)
        #: Latency of unary-response RPCs in ``lookaside_rpc_duration_seconds`` (None: a streaming response).
        self.duration = (
            metrics.duration.labels(service, method) if grpc_type in ("unary", "client_stream") else None
        )
        self._handled = metrics.handled_total
        self._legacy = metrics.rpcs
        self._handled_children: dict[str, Any] = {}
        self._legacy_children: dict[str, Any] = {}

    def handled(self, code: str, seconds: float) -> None:
        """Count the RPC's end with ``code`` (Python's name, ``NOT_FOUND``) after ``seconds``."""
        child = self._handled_children.get(code)
        if child is None:
            child = self._handled.labels(*self.labels, GO_CODES.get(code, code))
            self._handled_children[code] = child
        child.inc()
        legacy = self._legacy_children.get(code)
        if legacy is None:
            legacy = self._legacy.labels(self.labels[1], self.labels[2], code)
            self._legacy_children[code] = legacy
        legacy.inc()
        self.seconds.observe(seconds)
        if self.duration is not None:
            self.duration.observe(seconds)


@dataclass(frozen=True, slots=True)
class _TargetRow:
    name: str
    endpoints: int
    ready: int
    watchers: int
    version: int
    described: dict[str, Any]


#: The registry rows of the scrape running in this context, taken on the event loop before the exposition is
#: encoded in a worker thread (``asyncio.to_thread`` carries the context over).
_SNAPSHOT: contextvars.ContextVar[list[_TargetRow] | None] = contextvars.ContextVar(
    "lookaside_metrics_snapshot", default=None
)


class _RegistryCollector(Collector):
    """Reads the registry and the source's per-target state at scrape time: from the snapshot taken on the
    server's loop (``/metrics``), else directly (call :meth:`ServerMetrics.exposition` on the loop)."""

    def __init__(self, registry: Registry, tls: Any = None) -> None:
        self.registry = registry
        self.tls = tls

    def describe(self) -> list[Metric]:
        """The families without samples (so ``name[]`` filters find them), without reading anything."""
        return list(self._families([]))

    def _rows(self) -> list[_TargetRow]:
        rows = []
        for state, watchers in self.registry.states():
            eps = state.endpoints or ()
            try:
                described = dict(self.registry.source.describe(state.target))
            except Exception:  # noqa: BLE001 - a misbehaving source must not break the scrape
                described = {}
            rows.append(
                _TargetRow(
                    str(state.target),
                    len(eps),
                    sum(1 for e in eps if e.ready),
                    watchers,
                    state.version,
                    described,
                )
            )
        return rows

    def collect(self) -> Iterator[Metric]:
        rows = _SNAPSHOT.get()
        return self._families(self._rows() if rows is None else rows)

    def _families(self, rows: list[_TargetRow]) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "lookaside_targets", "Targets tracked (subscribed in the source).", value=len(rows)
        )
        families = [
            (
                GaugeMetricFamily,
                "lookaside_target_endpoints",
                "Endpoints of a target (any state).",
                lambda r: r.endpoints,
            ),
            (
                GaugeMetricFamily,
                "lookaside_target_ready_endpoints",
                "Ready endpoints of a target.",
                lambda r: r.ready,
            ),
            (
                GaugeMetricFamily,
                "lookaside_target_watchers",
                "Watch/xDS subscriptions of a target.",
                lambda r: r.watchers,
            ),
            (
                GaugeMetricFamily,
                "lookaside_target_version",
                "Version of a target's endpoint set.",
                lambda r: r.version,
            ),
        ]
        for kind, name, doc, value in families:
            fam = kind(name, doc, labels=["target"])
            for r in rows:
                fam.add_metric([r.name], value(r))
            yield fam
        for key, name, doc in (
            (
                "restarts",
                "lookaside_kubernetes_watch_restarts",
                "Kubernetes WATCH requests of a target resumed or restarted.",
            ),
            (
                "errors",
                "lookaside_kubernetes_watch_errors",
                "Errors talking to the Kubernetes API for a target.",
            ),
        ):
            cfam = CounterMetricFamily(name, doc, labels=["target"])
            for r in rows:
                if isinstance(r.described.get(key), int | float):
                    cfam.add_metric([r.name], float(r.described[key]))
            yield cfam
        if self.tls is not None:
            yield CounterMetricFamily(
                "lookaside_tls_reloads", "TLS certificate reloads (rotations).", value=self.tls.reloads
            )
            yield CounterMetricFamily(
                "lookaside_tls_reload_errors", "TLS file changes not usable.", value=self.tls.reload_errors
            )
            yield CounterMetricFamily(
                "lookaside_tls_refusals",
                "TLS certificates refused on rotation (expired, not yet valid, wrong usage).",
                value=self.tls.refusals,
            )


class ServerMetrics:
    """The metrics of one server, in a dedicated :class:`CollectorRegistry`."""

    def __init__(self, slots: StreamSlots | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        standard = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started", "Total number of RPCs started on the server.", standard, registry=r
        )
        self.handled_total = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*standard, "grpc_code"],
            registry=r,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the "
            "server.",
            standard,
            buckets=HANDLING_BUCKETS,
            registry=r,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received",
            "Total number of RPC stream messages received on the server.",
            standard,
            registry=r,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent",
            "Total number of gRPC stream messages sent by the server.",
            standard,
            registry=r,
        )
        self._methods: dict[tuple[str, str, str], MethodMetrics] = {}
        self.rpcs = Counter(
            "lookaside_rpcs",
            "Finished RPCs by service, method and status code (prefer grpc_server_handled_total).",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=r,
        )
        self.duration = Histogram(
            "lookaside_rpc_duration_seconds",
            "Latency of unary-response RPCs (Resolve, ...; prefer grpc_server_handling_seconds).",
            ["grpc_service", "grpc_method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.denied = Counter(
            "lookaside_access_denied",
            "Requests refused by the access policy, by reason.",
            ["reason"],
            registry=r,
        )
        self.limit_hits = Counter(
            "lookaside_limit_hits", "Requests refused because a limit was reached.", ["limit"], registry=r
        )
        self.xds_rejects = Counter(
            "lookaside_xds_rejects", "xDS request parts not served, by reason.", ["reason"], registry=r
        )
        for reason in ("namespace", "service", "identity"):
            self.denied.labels(reason)
        for limit in (
            MAX_WATCHES,
            MAX_WATCHES_PER_PEER,
            MAX_TARGETS,
            XDS_MAX_NAMES,
            XDS_MAX_ZONES,
            MAX_LOAD_REPORTS_PER_PEER,
            MAX_LOAD_REPORTS_PER_TARGET,
            MAX_LOAD_REPORT_ENDPOINTS,
            MAX_LOAD_REPORT_RATE,
            *HTTP_LIMITS,
        ):
            self.limit_hits.labels(limit)
        self.streams = Gauge(
            "lookaside_streams", "Open long-lived streams (Watch, xDS).", ["kind"], registry=r
        )
        for kind in STREAM_KINDS:
            self.streams.labels(kind).set_function(
                (lambda k: lambda: slots.by_kind[k] if slots is not None else 0)(kind)
            )
        self._collector: _RegistryCollector | None = None
        self._http: HttpServer | None = None
        Gauge(
            "lookaside_http_connections",
            "Open connections of the HTTP listener (status page, /metrics).",
            registry=r,
        ).set_function(lambda: self._http.connections if self._http is not None else 0)

    def deny(self, reason: str) -> None:
        """Count a denial."""
        self.denied.labels(reason).inc()

    def xds_reject(self, reason: str) -> None:
        """Count an xDS request part not served (``_xds.stream.REJECT_REASONS``)."""
        self.xds_rejects.labels(reason).inc()

    def limit_hit(self, limit: str) -> None:
        """Count a limit hit."""
        self.limit_hits.labels(limit).inc()

    def method(self, grpc_type: str, service: str, method: str) -> MethodMetrics:
        """The series of one method (only known methods reach here, so the label sets stay bounded)."""
        key = (grpc_type, service, method)
        found = self._methods.get(key)
        if found is None:
            found = self._methods[key] = MethodMetrics(self, grpc_type, service, method)
        return found

    def attach(self, registry: Registry, tls: Any = None) -> None:
        """Add the scrape-time collector over ``registry`` and the TLS store."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = _RegistryCollector(registry, tls)
        self.registry.register(self._collector)

    def exposition(self) -> bytes:
        """The classic text exposition format of every metric (call it on the server's loop)."""
        return generate_latest(self.registry)

    def add_route(self, http: HttpServer, path: str = "/metrics") -> None:
        """Serve the metrics at ``path`` on ``http`` through prometheus-client's own exposition: the format
        by the Accept header (OpenMetrics or the classic text format), gzip by Accept-Encoding, ``name[]``
        query filters. The registry is read on the loop; encoding and compression run in a worker thread."""
        self._http = http
        budget = RenderBudget(http.limits.renders_per_second, on_limit=http.limit_hit)

        async def handler(req: HttpRequest) -> HttpResponse:
            async def fresh() -> HttpResponse:
                rows = self._collector._rows() if self._collector is not None else None
                token = _SNAPSHOT.set(rows)
                try:
                    return await asyncio.to_thread(self._scrape, req)
                finally:
                    _SNAPSHOT.reset(token)

            # one rendering per format, compression and name filter asked for (the budget keeps 16 at most)
            key = (
                exposition.choose_encoder(req.headers.get("accept", ""))[1],
                exposition.gzip_accepted(req.headers.get("accept-encoding", "")),
                req.query,
            )
            return await budget.get(key, fresh)

        http.route(path, handler)

    def _scrape(self, req: HttpRequest) -> HttpResponse:
        encoder, content_type = exposition.choose_encoder(req.headers.get("accept", ""))
        names = parse_qs(req.query).get("name[]")
        registry = self.registry.restricted_registry(names) if names else self.registry
        body = encoder(registry)
        headers = {"Vary": "Accept, Accept-Encoding"}
        if exposition.gzip_accepted(req.headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return HttpResponse(200, body, content_type, headers)


def recorder(metrics: ServerMetrics | None) -> Callable[[str], None] | None:
    """The limit-hit recorder for ``metrics``."""
    return metrics.limit_hit if metrics is not None else None
