"""Observability: counters of picks, fallbacks, ejections and retries, readable from Python and exportable to
Prometheus (``register_prometheus``; prometheus-client is imported lazily and is not a dependency).

Rare events (fallbacks, ejections, retries, throttling) are counted under a lock; picks per endpoint are
counted lock-free on the pooled slots (``itertools.count``) and summed when read, so the hot path stays cheap.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

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

    def merge(self, other: Stats) -> Stats:
        """Add ``other`` into this snapshot (returns self)."""
        for mine, theirs in (
            (self.picks, other.picks),
            (self.fallbacks, other.fallbacks),
            (self.ejections, other.ejections),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
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
        with self._lock:
            return Stats(
                picks=dict(picks or {}),
                fallbacks=dict(self.fallbacks),
                ejections=dict(self.ejections),
                retries=self.retries,
                retries_over_budget=self.retries_over_budget,
                resolves=self.resolves,
                resolve_failures=self.resolve_failures,
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
        from prometheus_client.core import CounterMetricFamily

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
        yield from (picks, fallbacks, ejections, retries, over_budget, resolves, resolve_failures)

    def describe(self) -> list[Any]:
        return []  # unchecked collector: metric families are produced at scrape time


_registered: dict[int, _Collector] = {}


def register_prometheus(registry: Any = None) -> Any:
    """Export the counters through prometheus-client (imported here, lazily); idempotent per registry.

    Metric names: ``lookaside_grpc_picks_total{target,endpoint}``, ``lookaside_grpc_fallbacks_total{target,
    reason}``, ``lookaside_grpc_ejections_total{target,endpoint}``, ``lookaside_grpc_retries_total{target}``,
    ``lookaside_grpc_retries_over_budget_total{target}``, ``lookaside_grpc_resolves_total{target}``,
    ``lookaside_grpc_resolve_failures_total{target}``.
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
