"""Observability: counters of picks, fallbacks, ejections and retries, and per-endpoint call metrics (calls,
failures by status code, a latency histogram), readable from Python and exportable to Prometheus
(``register_prometheus``; prometheus-client is imported lazily and is not a dependency).

Rare events (fallbacks, ejections, retries, throttling) are counted under a lock; picks per endpoint are
counted lock-free on the pooled slots (``itertools.count``) and summed when read, so the hot path stays cheap;
so are the per-endpoint call metrics (:class:`EndpointMetrics`: one ``itertools.count`` per figure and
histogram bucket, no lock, nothing allocated per call).
"""

from __future__ import annotations

import bisect
import itertools
import threading
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

#: Fallback reasons (``Stats.fallbacks`` keys).
UNKNOWN_METHOD = "unknown_method"  # interceptor: method not in the protobuf descriptor pool
NO_ROUTE = "no_route"  # interceptor: gRPC service not configured in ``routes``
NO_ENDPOINTS = "no_endpoints"  # no endpoint known and the lookaside failed / did not answer in time
STALE = "stale"  # the last set is older than ``max_staleness``
LOCAL_ROTATION = "local_rotation"  # per_call: Resolve failed, picked from the last known set instead
THROTTLED = "throttled"  # per_call: Resolve throttled locally, picked from the last known set instead
UNRESOLVED_ROUTE = (
    "unresolved_route"  # interceptor: a route names a gRPC service unknown to the descriptor pool
)


#: Most addresses counted one by one per balancer; the rest are summed under OTHER_ADDRESSES.
MAX_ADDRESSES = 1024
OTHER_ADDRESSES = "(other)"

#: Upper bounds (seconds, ``le``) of the per-endpoint latency histogram's buckets, Prometheus-style (the last,
#: +Inf, is implicit): 0.25 ms (a loopback call) to 10 s (a stream's lifetime beyond lands in +Inf).
LATENCY_BUCKETS: tuple[float, ...] = (
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
    10.0,
)


def _read(counter: itertools.count[int]) -> int:
    """The next value of an ``itertools.count`` started at 0 (the number of increments so far), unchanged."""
    return int(repr(counter)[6:-1])


@dataclass(frozen=True)
class Histogram:
    """A latency histogram snapshot: ``counts[i]`` calls took at most ``bounds[i]`` seconds and more than
    ``bounds[i - 1]`` (the last count: more than ``bounds[-1]``, Prometheus' +Inf); ``sum`` in seconds."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS) + 1)
    sum: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, calls at most le seconds)`` pairs, the last ``le`` being ``inf`` (Prometheus buckets)."""
        out: list[tuple[float, int]] = []
        total = 0
        for le, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((le, total))
        return out

    def __add__(self, other: Histogram) -> Histogram:
        return Histogram(
            self.bounds,
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.sum + other.sum,
        )


class EndpointMetrics:
    """Calls ended on one backend address: how many, how many failed (by status code), how long they took.

    Lock-free: each figure is an ``itertools.count`` (``next()`` is atomic under the GIL) bumped when the call
    ends; the latency sum is a float add (a concurrent add may be lost under free threading: the counts stay
    exact). Failure counters are made on a code's first failure only."""

    __slots__ = ("_calls", "_call", "_buckets", "_bucket", "_failures", "seconds")

    def __init__(self) -> None:
        self._calls = itertools.count()
        self._call = self._calls.__next__
        self._buckets = tuple(itertools.count() for _ in range(len(LATENCY_BUCKETS) + 1))
        self._bucket = tuple(c.__next__ for c in self._buckets)
        self._failures: dict[grpc.StatusCode, itertools.count[int]] = {}
        #: Seconds of every call ended so far (the histogram's sum).
        self.seconds = 0.0

    def ended(self, seconds: float, code: grpc.StatusCode) -> None:
        """Count one call that ended with ``code`` after ``seconds``."""
        self._call()
        self._bucket[bisect.bisect_left(LATENCY_BUCKETS, seconds)]()
        self.seconds += seconds
        if code is not grpc.StatusCode.OK:
            counter = self._failures.get(code)
            if counter is None:
                counter = self._failures.setdefault(code, itertools.count())
            next(counter)

    @property
    def calls(self) -> int:
        return _read(self._calls)

    def failures(self) -> dict[str, int]:
        """Failed calls by status code name (``UNAVAILABLE``)."""
        return {code.name: _read(c) for code, c in list(self._failures.items())}

    def histogram(self) -> Histogram:
        return Histogram(LATENCY_BUCKETS, tuple(_read(c) for c in self._buckets), self.seconds)


class EndpointTable:
    """The :class:`EndpointMetrics` of one balancer by address (kept for the balancer's lifetime, retired
    addresses included, as picks are); at most :data:`MAX_ADDRESSES`, the rest share ``"(other)"``."""

    def __init__(self) -> None:
        self._by_address: dict[str, EndpointMetrics] = {}
        self._lock = threading.Lock()

    def get(self, address: str) -> EndpointMetrics:
        """The metrics of ``address`` (made on first use: once per address, not per call)."""
        m = self._by_address.get(address)
        if m is not None:
            return m
        with self._lock:
            m = self._by_address.get(address)
            if m is None:
                if len(self._by_address) >= MAX_ADDRESSES:
                    address = OTHER_ADDRESSES
                    m = self._by_address.get(address)
                if m is None:
                    m = self._by_address[address] = EndpointMetrics()
            return m

    def items(self) -> list[tuple[str, EndpointMetrics]]:
        return list(self._by_address.items())


@dataclass
class Stats:
    """A snapshot of the counters of one channel / interceptor (or of the whole process)."""

    #: Calls started per backend address.
    picks: dict[str, int] = field(default_factory=dict)
    #: Calls (or picks) that did not take the normal path, by reason (see the module constants).
    fallbacks: dict[str, int] = field(default_factory=dict)
    #: Ejections (local cool-downs after UNAVAILABLE) per backend address.
    ejections: dict[str, int] = field(default_factory=dict)
    #: Calls transparently retried on another endpoint.
    retries: int = 0
    #: Calls that could have been retried but were not, as the retry budget was spent.
    retries_over_budget: int = 0
    #: Resolve RPCs sent (per_call mode) and how many failed.
    resolves: int = 0
    resolve_failures: int = 0
    #: Calls ended per backend address (whatever their status; retried attempts count where they ran).
    calls: dict[str, int] = field(default_factory=dict)
    #: Calls ended with a status other than OK, per backend address, by status code name (``UNAVAILABLE``).
    failures: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Latency of the calls ended per backend address (a stream's: until it ended).
    latency: dict[str, Histogram] = field(default_factory=dict)

    def merge(self, other: Stats) -> Stats:
        """Add ``other`` into this snapshot (returns self)."""
        for mine, theirs in (
            (self.picks, other.picks),
            (self.fallbacks, other.fallbacks),
            (self.ejections, other.ejections),
            (self.calls, other.calls),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for address, codes in other.failures.items():
            by_code = self.failures.setdefault(address, {})
            for code, n in codes.items():
                by_code[code] = by_code.get(code, 0) + n
        for address, h in other.latency.items():
            mine_h = self.latency.get(address)
            self.latency[address] = h if mine_h is None else mine_h + h
        self.retries += other.retries
        self.retries_over_budget += other.retries_over_budget
        self.resolves += other.resolves
        self.resolve_failures += other.resolve_failures
        return self


class Counters:
    """The mutable counters behind a balancer or an interceptor; rare events only (locked)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fallbacks: Counter[str] = Counter()
        self.ejections: Counter[str] = Counter()
        self.retries = 0
        self.retries_over_budget = 0
        self.resolves = 0
        self.resolve_failures = 0
        #: Per-endpoint call metrics, counted lock-free by the call engine.
        self.endpoints = EndpointTable()

    def fallback(self, reason: str) -> None:
        with self._lock:
            self.fallbacks[reason] += 1

    def ejection(self, address: str) -> None:
        with self._lock:
            if address not in self.ejections and len(self.ejections) >= MAX_ADDRESSES:
                address = OTHER_ADDRESSES  # endpoint churn must not grow the counters without bound
            self.ejections[address] += 1

    def retry(self) -> None:
        with self._lock:
            self.retries += 1

    def over_budget(self) -> None:
        with self._lock:
            self.retries_over_budget += 1

    def resolve(self, ok: bool) -> None:
        with self._lock:
            self.resolves += 1
            if not ok:
                self.resolve_failures += 1

    def snapshot(self, picks: dict[str, int] | None = None) -> Stats:
        calls: dict[str, int] = {}
        failures: dict[str, dict[str, int]] = {}
        latency: dict[str, Histogram] = {}
        for address, m in self.endpoints.items():
            n = m.calls
            if not n:
                continue
            calls[address] = n
            latency[address] = m.histogram()
            failed = m.failures()
            if failed:
                failures[address] = failed
        with self._lock:
            return Stats(
                picks=dict(picks or {}),
                fallbacks=dict(self.fallbacks),
                ejections=dict(self.ejections),
                retries=self.retries,
                retries_over_budget=self.retries_over_budget,
                resolves=self.resolves,
                resolve_failures=self.resolve_failures,
                calls=calls,
                failures=failures,
                latency=latency,
            )


class StatsSource(Protocol):
    """Anything registered process-wide: yields (target label, stats) pairs."""

    def _stats_items(self) -> Iterable[tuple[str, Stats]]: ...


_sources: weakref.WeakSet[Any] = weakref.WeakSet()
_sources_lock = threading.Lock()


def track(source: StatsSource) -> None:
    """Register a balancer or interceptor for ``stats()`` and the Prometheus collector (weakly)."""
    with _sources_lock:
        _sources.add(source)


def untrack(source: StatsSource) -> None:
    with _sources_lock:
        _sources.discard(source)


def _items() -> list[tuple[str, Stats]]:
    with _sources_lock:
        sources = list(_sources)
    out: list[tuple[str, Stats]] = []
    for s in sources:
        out.extend(s._stats_items())
    return out


def stats() -> dict[str, Stats]:
    """Process-wide counters per target label (``service.namespace[:port]``, or ``interceptor`` for the
    interceptor's own fallbacks), summed over every live channel and interceptor."""
    out: dict[str, Stats] = {}
    for label, st in _items():
        out.setdefault(label, Stats()).merge(st)
    return out


class _Collector:
    """A prometheus_client custom collector over ``stats()``."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        picks = CounterMetricFamily(
            "lookaside_grpc_picks", "Calls started per backend endpoint", labels=["target", "endpoint"]
        )
        fallbacks = CounterMetricFamily(
            "lookaside_grpc_fallbacks",
            "Calls that took a fallback path, by reason",
            labels=["target", "reason"],
        )
        ejections = CounterMetricFamily(
            "lookaside_grpc_ejections", "Endpoints ejected after UNAVAILABLE", labels=["target", "endpoint"]
        )
        retries = CounterMetricFamily(
            "lookaside_grpc_retries", "Calls transparently retried on another endpoint", labels=["target"]
        )
        over_budget = CounterMetricFamily(
            "lookaside_grpc_retries_over_budget",
            "Calls not retried as the retry budget was spent",
            labels=["target"],
        )
        resolves = CounterMetricFamily(
            "lookaside_grpc_resolves", "Resolve RPCs sent (per_call mode)", labels=["target"]
        )
        resolve_failures = CounterMetricFamily(
            "lookaside_grpc_resolve_failures", "Resolve RPCs that failed (per_call mode)", labels=["target"]
        )
        calls = CounterMetricFamily(
            "lookaside_grpc_endpoint_calls", "Calls ended per backend endpoint", labels=["target", "endpoint"]
        )
        failures = CounterMetricFamily(
            "lookaside_grpc_endpoint_failures",
            "Calls ended with a non-OK status per backend endpoint, by code",
            labels=["target", "endpoint", "grpc_code"],
        )
        latency = HistogramMetricFamily(
            "lookaside_grpc_endpoint_latency_seconds",
            "Latency of the calls per backend endpoint (streams: until they ended)",
            labels=["target", "endpoint"],
        )
        for label, st in stats().items():
            for ep, n in st.picks.items():
                picks.add_metric([label, ep], n)
            for reason, n in st.fallbacks.items():
                fallbacks.add_metric([label, reason], n)
            for ep, n in st.ejections.items():
                ejections.add_metric([label, ep], n)
            retries.add_metric([label], st.retries)
            over_budget.add_metric([label], st.retries_over_budget)
            resolves.add_metric([label], st.resolves)
            resolve_failures.add_metric([label], st.resolve_failures)
            for ep, n in st.calls.items():
                calls.add_metric([label, ep], n)
            for ep, codes in st.failures.items():
                for code, n in codes.items():
                    failures.add_metric([label, ep, grpc_code_label(code)], n)
            for ep, h in st.latency.items():
                latency.add_metric(
                    [label, ep], [(_le(le), float(n)) for le, n in h.cumulative()], sum_value=h.sum
                )
        yield from (picks, fallbacks, ejections, retries, over_budget, resolves, resolve_failures)
        yield from (calls, failures, latency)

    def describe(self) -> list[Any]:
        return []  # unchecked collector: metric families are produced at scrape time


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def grpc_code_label(name: str) -> str:
    """A status code name (``DEADLINE_EXCEEDED``) as grpc-go and go-grpc-prometheus spell it
    (``DeadlineExceeded``; ``CANCELLED`` is ``Canceled``), the ``grpc_code`` of the usual dashboards."""
    if name == "OK":
        return "OK"
    if name == "CANCELLED":
        return "Canceled"
    return "".join(part.capitalize() for part in name.split("_"))


_registered: dict[int, _Collector] = {}


def register_prometheus(registry: Any = None) -> Any:
    """Export the counters through prometheus-client (imported here, lazily); idempotent per registry.

    Metric names: ``lookaside_grpc_picks_total{target,endpoint}``, ``lookaside_grpc_fallbacks_total{target,
    reason}``, ``lookaside_grpc_ejections_total{target,endpoint}``, ``lookaside_grpc_retries_total{target}``,
    ``lookaside_grpc_retries_over_budget_total{target}``, ``lookaside_grpc_resolves_total{target}``,
    ``lookaside_grpc_resolve_failures_total{target}``; per backend endpoint
    ``lookaside_grpc_endpoint_calls_total{target,endpoint}``,
    ``lookaside_grpc_endpoint_failures_total{target,endpoint,grpc_code}`` (codes spelled as grpc-go does:
    ``Unavailable``) and the histogram ``lookaside_grpc_endpoint_latency_seconds{target,endpoint}``.
    ``registry`` defaults to ``prometheus_client.REGISTRY``. Returns the collector.
    """
    try:
        import prometheus_client
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "register_prometheus needs prometheus-client: pip install prometheus-client"
        ) from e
    reg = prometheus_client.REGISTRY if registry is None else registry
    collector = _registered.get(id(reg))
    if collector is None:
        collector = _registered[id(reg)] = _Collector()
        reg.register(collector)
    return collector
