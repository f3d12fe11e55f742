"""Server-assisted load balancing: the load clients report (ReportLoad), aggregated per target, turned into
per-endpoint weights for Watch subscribers, and the load-aware Resolve pickers.

Every client balancer with a server-assisted policy reports, about once a second, its calls in flight and its
latency EWMA per endpoint. A report replaces that client's previous one and expires after a few of its
intervals. Per endpoint the board sums the calls in flight over clients and averages the latency (weighted by
the calls each client started). The cost of an endpoint is latency x (in flight + 1) (unknown latency: the
mean of the known ones); its weight is proportional to 1 / cost, scaled so the cheapest gets
:data:`WEIGHT_SCALE` (and none less than 1). Weights are republished to Watch subscribers only when they
change meaningfully (:data:`CHANGE_THRESHOLD`), at most once per :data:`MIN_PUSH_INTERVAL` per target.
Everything runs on the server's event loop (no locks).

``weights(target)`` is the published view; the xDS control plane (``_xds``) serves it as the locality
weights of each ClusterLoadAssignment and, like Watch, republishes on every ``listen`` callback.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from lookaside_grpc import protocol as pb
from lookaside_grpc._policies import weighted_schedule
from lookaside_server._core.model import BackendEndpoint, Target

log = logging.getLogger(__name__)

#: The report interval acknowledgements ask clients for (seconds).
REPORT_INTERVAL = 1.0
#: A client's report expires after this many of its intervals without a newer one.
EXPIRY_INTERVALS = 3.0
#: At most one weight push per target per this many seconds.
MIN_PUSH_INTERVAL = 0.5
#: The weight of the cheapest endpoint; the others get proportionally less (at least 1).
WEIGHT_SCALE = 100
#: A weight change counts (and is pushed) when some endpoint's weight moves by this fraction of the larger.
CHANGE_THRESHOLD = 0.2
#: Endpoints of one report beyond this are ignored (bounded memory per client).
MAX_REPORT_ENDPOINTS = 1000
#: Clients reporting on one target beyond this are ignored until some expire.
MAX_CLIENTS = 10000

Key = tuple[str, int]  # (ip, port)


@dataclass(frozen=True, slots=True)
class Load:
    """The aggregated load of one endpoint: calls in flight over every client, mean latency (0 unknown)."""

    outstanding: int = 0
    latency_ms: float = 0.0


@dataclass(slots=True)
class _Report:
    expires: float
    loads: dict[Key, tuple[int, float, int]]  # (outstanding, latency_ms, calls)


class _TargetLoad:
    __slots__ = ("reports", "view", "weights", "last_push", "timer", "listeners", "rr", "schedules")

    def __init__(self) -> None:
        self.reports: dict[str, _Report] = {}
        self.view: dict[Key, Load] | None = None  # cached aggregate, None = recompute
        self.weights: dict[Key, int] = {}  # published
        self.last_push = float("-inf")
        self.timer: asyncio.TimerHandle | None = None
        self.listeners: set[Callable[[], None]] = set()
        self.rr = 0  # WEIGHTED rotation position, shared by every Resolve on the target
        self.schedules: dict[tuple[tuple[Key, int], ...], list[int]] = {}


def cost(load: Load | None, default_latency: float) -> float:
    """latency x (in flight + 1), with ``default_latency`` when the latency is unknown."""
    if load is None:
        return default_latency
    lat = load.latency_ms if load.latency_ms > 0 else default_latency
    return lat * (load.outstanding + 1)


def _mean_latency(view: dict[Key, Load]) -> float:
    known = [v.latency_ms for v in view.values() if v.latency_ms > 0]
    return sum(known) / len(known) if known else 1.0


def compute_weights(view: dict[Key, Load]) -> dict[Key, int]:
    """Weights proportional to 1 / cost (the cheapest gets WEIGHT_SCALE, none less than 1)."""
    if not view:
        return {}
    default = _mean_latency(view)
    costs = {k: max(cost(v, default), 1e-9) for k, v in view.items()}
    cheapest = min(costs.values())
    return {k: max(1, round(WEIGHT_SCALE * cheapest / c)) for k, c in costs.items()}


def meaningful(old: dict[Key, int], new: dict[Key, int]) -> bool:
    """Whether ``new`` differs enough from the published ``old`` to be pushed."""
    if old.keys() != new.keys():
        return True
    for k, w in new.items():
        o = old[k]
        if abs(w - o) >= 2 and abs(w - o) > CHANGE_THRESHOLD * max(w, o):
            return True
    return False


class LoadBoard:
    """Aggregated client load per target, the weights derived from it, and the load-aware pickers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._targets: dict[Target, _TargetLoad] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.reports = 0

    @property
    def report_interval(self) -> float:
        return REPORT_INTERVAL

    # ----------------------------------------------------------------------------------------- reports
    def report(self, target: Target, client_id: str, interval: float,
               loads: Iterable[pb.EndpointLoad]) -> None:
        """Record one client's report (replacing its previous one) and republish weights if they moved."""
        now = self._clock()
        tl = self._targets.get(target)
        if tl is None:
            tl = self._targets[target] = _TargetLoad()
        if client_id not in tl.reports and len(tl.reports) >= MAX_CLIENTS:
            self._expire(tl, now)
            if len(tl.reports) >= MAX_CLIENTS:
                return
        interval = min(max(interval or REPORT_INTERVAL, 0.05), 60.0)
        entries: dict[Key, tuple[int, float, int]] = {}
        for i, e in enumerate(loads):
            if i >= MAX_REPORT_ENDPOINTS:
                break
            lat = e.latency_ms if e.latency_ms > 0 and e.latency_ms < 1e9 else 0.0
            entries[(e.ip, e.port)] = (e.outstanding, lat, e.calls)
        tl.reports[client_id] = _Report(now + EXPIRY_INTERVALS * interval, entries)
        tl.view = None
        self.reports += 1
        self._schedule(target, tl, now)
        self._arm_sweep()

    def _expire(self, tl: _TargetLoad, now: float) -> bool:
        gone = [c for c, r in tl.reports.items() if r.expires <= now]
        for c in gone:
            del tl.reports[c]
        if gone:
            tl.view = None
        return bool(gone)

    def loads(self, target: Target) -> dict[Key, Load]:
        """The aggregated load per endpoint of ``target`` (expired reports dropped)."""
        tl = self._targets.get(target)
        if tl is None:
            return {}
        self._expire(tl, self._clock())
        if tl.view is None:
            tl.view = self._aggregate(tl.reports.values())
        return tl.view

    @staticmethod
    def _aggregate(reports: Iterable[_Report]) -> dict[Key, Load]:
        out: dict[Key, list[float]] = {}  # key -> [outstanding, latency x weight, weight]
        for r in reports:
            for k, (outstanding, lat, calls) in r.loads.items():
                acc = out.get(k)
                if acc is None:
                    acc = out[k] = [0, 0.0, 0.0]
                acc[0] += outstanding
                if lat > 0:
                    w = calls + 1.0
                    acc[1] += lat * w
                    acc[2] += w
        return {k: Load(int(a[0]), a[1] / a[2] if a[2] else 0.0) for k, a in out.items()}

    # ----------------------------------------------------------------------------------------- weights
    def weights(self, target: Target) -> dict[Key, int]:
        """The published weights of ``target`` by (ip, port); empty without load reports."""
        tl = self._targets.get(target)
        return tl.weights if tl is not None else {}

    def listen(self, target: Target, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the loop) whenever the published weights of ``target`` change."""
        tl = self._targets.get(target)
        if tl is None:
            tl = self._targets[target] = _TargetLoad()
        tl.listeners.add(callback)

    def unlisten(self, target: Target, callback: Callable[[], None]) -> None:
        tl = self._targets.get(target)
        if tl is not None:
            tl.listeners.discard(callback)

    def _schedule(self, target: Target, tl: _TargetLoad, now: float) -> None:
        if tl.timer is not None:
            return
        wait = tl.last_push + MIN_PUSH_INTERVAL - now
        if wait <= 0:
            self._update(target, tl)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._update(target, tl)
            return
        tl.timer = loop.call_later(wait, self._timer_fired, target, tl)

    def _timer_fired(self, target: Target, tl: _TargetLoad) -> None:
        tl.timer = None
        self._update(target, tl)

    def _update(self, target: Target, tl: _TargetLoad) -> None:
        new = compute_weights(self.loads(target))
        if not meaningful(tl.weights, new):
            return
        tl.weights = new
        tl.last_push = self._clock()
        log.debug("target %s: weights %s", target, new)
        for cb in list(tl.listeners):
            try:
                cb()
            except Exception:  # noqa: BLE001 - one broken listener must not stop the others
                log.exception("weight listener failed")

    def _arm_sweep(self) -> None:
        """While reports exist, re-check every interval so expired reports fade out of the weights."""
        if self._sweep is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sweep = loop.call_later(REPORT_INTERVAL, self._sweep_now)

    def _sweep_now(self) -> None:
        self._sweep = None
        now = self._clock()
        live = False
        for target, tl in list(self._targets.items()):
            if self._expire(tl, now):
                self._schedule(target, tl, now)
            if tl.reports:
                live = True
            elif not tl.listeners and tl.timer is None and not tl.weights:
                del self._targets[target]
        if live:
            self._arm_sweep()

    def close(self) -> None:
        """Cancel timers (server shutdown)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for tl in self._targets.values():
            if tl.timer is not None:
                tl.timer.cancel()
                tl.timer = None

    # ----------------------------------------------------------------------------------------- picking
    def pick(self, target: Target, router: int, candidates: Sequence[BackendEndpoint],
             count: int) -> list[BackendEndpoint]:
        """``count`` picks for Resolve with a load router: LEAST_REQUEST (power of two choices over the
        calls in flight of all clients), PEAK_EWMA (power of two choices over latency x (in flight + 1)) or
        WEIGHTED (weighted rotation over the published weights, shared by every client of the target). Picks
        within one Resolve count as in flight for the next ones."""
        if router == pb.WEIGHTED:
            return self._weighted(target, candidates, count)
        view = self.loads(target)
        keys = [(e.ip, e.port) for e in candidates]
        if router == pb.LEAST_REQUEST:
            costs = [float(view[k].outstanding) if k in view else 0.0 for k in keys]
            step = [1.0] * len(keys)
        else:
            default = _mean_latency(view) if view else 1.0
            lats = [(view[k].latency_ms if k in view and view[k].latency_ms > 0 else default) for k in keys]
            outs = [view[k].outstanding if k in view else 0 for k in keys]
            costs = [lat * (o + 1) for lat, o in zip(lats, outs, strict=True)]
            step = lats
        n = len(candidates)
        out: list[BackendEndpoint] = []
        rand = self._rng.random
        for _ in range(count):
            if n == 1:
                i = 0
            else:
                i = int(rand() * n)
                j = int(rand() * (n - 1))
                if j >= i:
                    j += 1
                if costs[j] < costs[i]:
                    i = j
            out.append(candidates[i])
            costs[i] += step[i]
        return out

    def _weighted(self, target: Target, candidates: Sequence[BackendEndpoint],
                  count: int) -> list[BackendEndpoint]:
        tl = self._targets.get(target)
        if tl is None:
            tl = self._targets[target] = _TargetLoad()
        weights = tl.weights
        key = tuple(((e.ip, e.port), weights.get((e.ip, e.port), 0)) for e in candidates)
        sched = tl.schedules.get(key)
        if sched is None:
            if len(tl.schedules) > 16:
                tl.schedules.clear()
            sched = tl.schedules[key] = weighted_schedule([w for _, w in key])
        start = tl.rr
        tl.rr = start + count
        return [candidates[sched[(start + i) % len(sched)]] for i in range(count)]
