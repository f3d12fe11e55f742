"""Server-assisted load balancing: the load clients report (ReportLoad), aggregated per target, turned into
per-endpoint weights for Watch subscribers, and the load-aware Resolve pickers.

Every client balancer with a server-assisted policy reports, about once a second, its calls in flight and its
latency EWMA per endpoint. A report replaces that client's previous one and expires after a few of its
intervals. Per endpoint the board sums the calls in flight over clients and averages the latency (weighted by
the calls each client started). The cost of an endpoint is latency x (in flight + 1) (unknown latency: the
mean of the known ones); its weight is proportional to 1 / cost, scaled so the cheapest gets
:data:`WEIGHT_SCALE` (and none less than 1). Weights are republished to Watch subscribers only when they
change meaningfully (:data:`CHANGE_THRESHOLD`), at most once per :data:`MIN_PUSH_INTERVAL` per target.

Bounded and incremental, as a client may be hostile (:class:`LoadLimits`):

* a report may name at most ``max_report_endpoints`` endpoints; endpoints that are not in the target's
  current set are dropped, so the per-target aggregate never holds more endpoints than the target has (plus
  ones just removed, until the last report naming them expires);
* one client IP may hold at most ``max_reports_per_peer`` stored reports (distinct client ids, over every
  target) and one target at most ``max_reports_per_target``; a report beyond a limit is refused with
  :class:`ReportRefused` (the servicer answers RESOURCE_EXHAUSTED naming the limit); a client's own next
  report always replaces its previous one;
* one client IP may send at most ``max_report_rate_per_peer`` reports a second (a token bucket per IP, at
  most :data:`MAX_RATE_PEERS` IPs tracked), checked first (``take_report_token``);
* a report's interval counts at most :data:`MAX_INTERVAL` s, so a stored report expires within
  ``EXPIRY_INTERVALS x MAX_INTERVAL`` s;
* aggregation is incremental: per endpoint slot the board keeps running sums, a report adds its entries and
  subtracts the entries of the report it replaces (O(its size), never O(all reports)), and stores its entries
  packed in arrays (about 30 bytes per endpoint); the load-aware pickers read the sums of their candidates
  only. Everything runs on the server's event loop (no locks), and no step walks more than one report or one
  target's endpoints.

``weights(target)`` is the published view; the xDS control plane (``_xds``) serves it as the locality
weights of each ClusterLoadAssignment and, like Watch, republishes on every ``listen`` callback.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from array import array
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from lookaside_grpc import protocol as pb
from lookaside_server._core.model import BackendEndpoint, Target
from lookaside_server._core.token_bucket import TokenBucket

log = logging.getLogger(__name__)

#: The report interval acknowledgements ask clients for (seconds).
REPORT_INTERVAL = 1.0
#: A client's report expires after this many of its intervals without a newer one.
EXPIRY_INTERVALS = 3.0
#: The longest report interval honoured (seconds): a report is never kept longer than 3 x this.
MAX_INTERVAL = 10.0
#: At most one weight push per target per this many seconds.
MIN_PUSH_INTERVAL = 0.5
#: The weight of the cheapest endpoint; the others get proportionally less (at least 1).
WEIGHT_SCALE = 100
#: A weight change counts (and is pushed) when some endpoint's weight moves by this fraction of the larger.
CHANGE_THRESHOLD = 0.2

#: Limit names (metrics label ``lookaside_limit_hits_total{limit}``) and the flags that set them.
MAX_LOAD_REPORTS_PER_PEER = "max_load_reports_per_peer"
MAX_LOAD_REPORTS_PER_TARGET = "max_load_reports_per_target"
MAX_LOAD_REPORT_ENDPOINTS = "max_load_report_endpoints"
MAX_LOAD_REPORT_RATE = "max_load_report_rate_per_peer"
#: Client IPs whose report rate is tracked at once (see ``LoadBoard.take_report_token``).
MAX_RATE_PEERS = 4096
FLAGS = {
    MAX_LOAD_REPORT_RATE: "--max-load-report-rate-per-peer / LB_MAX_LOAD_REPORT_RATE_PER_PEER",
    MAX_LOAD_REPORTS_PER_PEER: "--max-load-reports-per-peer / LB_MAX_LOAD_REPORTS_PER_PEER",
    MAX_LOAD_REPORTS_PER_TARGET: "--max-load-reports-per-target / LB_MAX_LOAD_REPORTS_PER_TARGET",
    MAX_LOAD_REPORT_ENDPOINTS: "--max-load-report-endpoints / LB_MAX_LOAD_REPORT_ENDPOINTS",
}

Key = tuple[str, int]  # (ip, port)


@dataclass(frozen=True)
class LoadLimits:
    """Caps on the load reports the board stores (see the module docstring)."""

    #: Stored reports (distinct client ids, over every target) one client IP may hold.
    max_reports_per_peer: int = 64
    #: Stored reports (distinct client ids) one target may hold.
    max_reports_per_target: int = 1000
    #: Endpoints one report may name (the client library sends at most 1000).
    max_report_endpoints: int = 1000
    #: Reports per second one client IP may send (a burst of as many): clients report every
    #: ``REPORT_INTERVAL`` per target, so the default leaves twice the room ``max_reports_per_peer`` needs.
    max_report_rate_per_peer: float = 128.0

    def __post_init__(self) -> None:
        for name in ("max_reports_per_peer", "max_reports_per_target", "max_report_endpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.max_report_rate_per_peer > 0:
            raise ValueError("max_report_rate_per_peer must be positive")


class ReportRefused(Exception):
    """A report beyond one of the :class:`LoadLimits`; ``limit`` names it (one of the ``MAX_LOAD_*``)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Load:
    """The aggregated load of one endpoint: calls in flight over every client, mean latency (0 unknown)."""

    outstanding: int = 0
    latency_ms: float = 0.0


class _Report:
    """One client's stored report: the endpoint slots it names and, per slot, (in flight, latency x weight,
    weight), packed."""

    __slots__ = ("expires", "peer", "slots", "values")

    def __init__(self, expires: float, peer: str, slots: array, values: array) -> None:
        self.expires = expires
        self.peer = peer
        self.slots = slots  # array('l'): slot per entry
        self.values = values  # array('d'): 3 per entry


class _TargetLoad:
    """One target's reports and their running sums per endpoint slot."""

    __slots__ = (
        "reports",
        "index",
        "keys",
        "out",
        "latw",
        "w",
        "refs",
        "free",
        "view",
        "weights",
        "weights_version",
        "last_push",
        "last_check",
        "timer",
        "listeners",
        "rr",
        "schedules",
        "known",
    )

    def __init__(self) -> None:
        self.reports: dict[str, _Report] = {}
        self.index: dict[Key, int] = {}  # endpoint -> slot
        self.keys: list[Key | None] = []  # slot -> endpoint (None: free)
        self.out: list[int] = []  # sum of calls in flight
        self.latw: list[float] = []  # sum of latency x weight
        self.w: list[float] = []  # sum of weights
        self.refs: list[int] = []  # reports naming the slot
        self.free: list[int] = []
        self.view: dict[Key, Load] | None = None  # cached aggregate, None = recompute
        self.weights: dict[Key, int] = {}  # published
        self.weights_version = 0
        self.last_push = float("-inf")
        self.last_check = float("-inf")  # the weights are recomputed at most once per MIN_PUSH_INTERVAL
        self.timer: asyncio.TimerHandle | None = None
        self.listeners: set[Callable[[], None]] = set()
        self.rr = 0  # WEIGHTED rotation position, shared by every Resolve on the target
        self.schedules: dict[tuple[tuple[Key, int], ...], list[int]] = {}
        self.known: tuple[object, frozenset[Key]] | None = None  # (endpoints it was built from, keys)

    def slot(self, key: Key) -> int:
        i = self.index.get(key)
        if i is not None:
            return i
        if self.free:
            i = self.free.pop()
            self.keys[i] = key
        else:
            i = len(self.keys)
            self.keys.append(key)
            self.out.append(0)
            self.latw.append(0.0)
            self.w.append(0.0)
            self.refs.append(0)
        self.index[key] = i
        return i

    def add(self, r: _Report) -> None:
        out, latw, w, refs, v = self.out, self.latw, self.w, self.refs, r.values
        for n, i in enumerate(r.slots):
            out[i] += int(v[3 * n])
            latw[i] += v[3 * n + 1]
            w[i] += v[3 * n + 2]
            refs[i] += 1

    def remove(self, r: _Report) -> None:
        out, latw, w, refs, v = self.out, self.latw, self.w, self.refs, r.values
        for n, i in enumerate(r.slots):
            refs[i] -= 1
            if refs[i] <= 0:  # the last report naming it: free the slot, exactly zero again
                self.index.pop(self.keys[i], None)  # type: ignore[arg-type]
                self.keys[i] = None
                out[i], latw[i], w[i], refs[i] = 0, 0.0, 0.0, 0
                self.free.append(i)
            else:
                out[i] -= int(v[3 * n])
                latw[i] -= v[3 * n + 1]
                w[i] -= v[3 * n + 2]

    def load(self, i: int) -> tuple[int, float]:
        """(calls in flight, mean latency or 0) of slot ``i``."""
        w = self.w[i]
        return self.out[i], (self.latw[i] / w if w > 1e-9 else 0.0)


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

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        limits: LoadLimits | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self.limits = limits or LoadLimits()
        self._targets: dict[Target, _TargetLoad] = {}
        #: Stored reports per client IP: peer -> {(target, client id)}.
        self._by_peer: dict[str, set[tuple[Target, str]]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.reports = 0
        #: Report rate per client IP, most recent last; beyond
        #: ``max_rate_peers`` the refilled ones are dropped, then the oldest (whose next report starts full).
        self._rates: dict[str, TokenBucket] = {}
        self.max_rate_peers = MAX_RATE_PEERS

    @property
    def report_interval(self) -> float:
        return REPORT_INTERVAL

    # ----------------------------------------------------------------------------------------- reports
    def report(
        self,
        target: Target,
        client_id: str,
        interval: float,
        loads: Sequence[pb.EndpointLoad],
        *,
        peer: str = "",
        endpoints: Collection[BackendEndpoint] | None = None,
    ) -> int:
        """Record one client's report (replacing its previous one) and republish weights if they moved.

        ``peer`` is the client IP (for the per-peer cap); ``endpoints`` the target's current set (entries for
        other endpoints are dropped; None keeps all). Returns how many entries were kept; raises
        :class:`ReportRefused` beyond a limit (then nothing changes)."""
        now = self._clock()
        tl = self.admit(target, client_id, len(loads), peer, now)
        old = tl.reports.get(client_id)
        known = self._known(tl, endpoints)
        entries: dict[int, tuple[int, float, float]] = {}
        index, slot = tl.index, tl.slot
        for e in loads:
            key = (e.ip, e.port)
            if known is not None and key not in known:
                continue
            lat = e.latency_ms
            if 0 < lat < 1e9:
                weight = e.calls + 1.0
                latw = lat * weight
            else:
                weight = latw = 0.0
            i = index.get(key)
            entries[slot(key) if i is None else i] = (e.outstanding, latw, weight)
        values = array("d", [x for v in entries.values() for x in v])
        interval = min(max(interval or REPORT_INTERVAL, 0.05), MAX_INTERVAL)
        new = _Report(now + EXPIRY_INTERVALS * interval, peer, array("l", entries), values)
        tl.add(new)  # before removing the old one, so slots both name stay put
        if old is not None:
            tl.remove(old)
            self._forget_peer(old.peer, target, client_id)
        tl.reports[client_id] = new
        self._by_peer.setdefault(peer, set()).add((target, client_id))
        tl.view = None
        self.reports += 1
        self._schedule(target, tl, now)
        self._arm_sweep()
        return len(entries)

    def admit(
        self, target: Target, client_id: str, endpoints: int, peer: str = "", now: float | None = None
    ) -> _TargetLoad:
        """Raise :class:`ReportRefused` if a report of ``endpoints`` endpoints from ``peer`` as ``client_id``
        on ``target`` would exceed a limit (cheap: call it before queueing the report)."""
        lim = self.limits
        if endpoints > lim.max_report_endpoints:
            raise ReportRefused(
                MAX_LOAD_REPORT_ENDPOINTS,
                (
                    f"target {target}: the report names {endpoints} endpoints, at most "
                    f"{lim.max_report_endpoints} are accepted ({FLAGS[MAX_LOAD_REPORT_ENDPOINTS]})"
                ),
            )
        now = self._clock() if now is None else now
        tl = self._targets.get(target)
        if tl is None:
            tl = self._targets[target] = _TargetLoad()
        old = tl.reports.get(client_id)
        if old is None or old.peer != peer:
            self._check_room(target, tl, peer, now)
        return tl

    def take_report_token(self, target: Target, peer: str, now: float | None = None) -> None:
        """Spend one of ``peer``'s report tokens or raise ReportRefused (``max_report_rate_per_peer``): once
        per ReportLoad call, before anything else is looked at."""
        now = self._clock() if now is None else now
        rate = self.limits.max_report_rate_per_peer
        bucket = self._rates.get(peer)
        if bucket is None:
            bucket = self._rates[peer] = TokenBucket(rate, rate, now)
        if not bucket.take(now):
            raise ReportRefused(
                MAX_LOAD_REPORT_RATE,
                f"target {target}: more than {rate:g} load reports a second from {peer or 'this client'} "
                f"({FLAGS[MAX_LOAD_REPORT_RATE]})",
            )
        self._rates[peer] = self._rates.pop(peer)  # newest last
        if len(self._rates) > self.max_rate_peers:  # bounded: drop the refilled ones, then the oldest
            kept = [(p, b) for p, b in self._rates.items() if not b.full(now)]
            self._rates = dict(kept[-(self.max_rate_peers // 2) :])

    def _check_room(self, target: Target, tl: _TargetLoad, peer: str, now: float) -> None:
        """Raise ReportRefused if a new report from ``peer`` on ``target`` would exceed a cap (expired
        reports are dropped first)."""
        lim = self.limits
        if len(tl.reports) >= lim.max_reports_per_target:
            self._expire(tl, now, target)
            if len(tl.reports) >= lim.max_reports_per_target:
                raise ReportRefused(
                    MAX_LOAD_REPORTS_PER_TARGET,
                    (
                        f"target {target}: already {len(tl.reports)} clients report load on it, at most "
                        f"{lim.max_reports_per_target} ({FLAGS[MAX_LOAD_REPORTS_PER_TARGET]})"
                    ),
                )
        mine = self._by_peer.get(peer)
        if mine is not None and len(mine) >= lim.max_reports_per_peer:
            for t, c in list(mine):  # at most max_reports_per_peer of them
                other = self._targets.get(t)
                r = other.reports.get(c) if other is not None else None
                if r is None:
                    self._forget_peer(peer, t, c)
                elif r.expires <= now:
                    self._drop(t, c)
            if len(mine) >= lim.max_reports_per_peer:
                raise ReportRefused(
                    MAX_LOAD_REPORTS_PER_PEER,
                    (
                        f"too many load reports from {peer or 'this client'}: it already holds "
                        f"{len(mine)} client ids' reports, at most {lim.max_reports_per_peer} "
                        f"({FLAGS[MAX_LOAD_REPORTS_PER_PEER]})"
                    ),
                )

    @staticmethod
    def _known(tl: _TargetLoad, endpoints: Collection[BackendEndpoint] | None) -> frozenset[Key] | None:
        if endpoints is None:
            return None
        cached = tl.known
        if cached is None or cached[0] is not endpoints:  # one set per target version
            cached = tl.known = (endpoints, frozenset((e.ip, e.port) for e in endpoints))
        return cached[1]

    def _forget_peer(self, peer: str, target: Target, client_id: str) -> None:
        mine = self._by_peer.get(peer)
        if mine is not None:
            mine.discard((target, client_id))
            if not mine:
                del self._by_peer[peer]

    def _drop(self, target: Target, client_id: str) -> None:
        """Remove one stored report (if still there) and its peer entry."""
        tl = self._targets.get(target)
        r = tl.reports.pop(client_id, None) if tl is not None else None
        if r is None or tl is None:
            return
        tl.remove(r)
        tl.view = None
        self._forget_peer(r.peer, target, client_id)

    def _expire(self, tl: _TargetLoad, now: float, target: Target) -> bool:
        gone = [c for c, r in tl.reports.items() if r.expires <= now]
        for c in gone:
            r = tl.reports.pop(c)
            tl.remove(r)
            self._forget_peer(r.peer, target, c)
        if gone:
            tl.view = None
        return bool(gone)

    def stored(self) -> int:
        """How many reports are stored now, over every target."""
        return sum(len(tl.reports) for tl in self._targets.values())

    def loads(self, target: Target) -> dict[Key, Load]:
        """The aggregated load per endpoint of ``target`` (expired reports dropped)."""
        tl = self._targets.get(target)
        if tl is None:
            return {}
        self._expire(tl, self._clock(), target)
        if tl.view is None:
            view = {}
            for i, key in enumerate(tl.keys):
                if key is not None:
                    out, lat = tl.load(i)
                    view[key] = Load(out, lat)
            tl.view = view
        return tl.view

    # ----------------------------------------------------------------------------------------- weights
    def weights(self, target: Target) -> dict[Key, int]:
        """The published weights of ``target`` by (ip, port); empty without load reports."""
        tl = self._targets.get(target)
        return tl.weights if tl is not None else {}

    def weights_version(self, target: Target) -> int:
        """A number that changes whenever the published weights of ``target`` change."""
        tl = self._targets.get(target)
        return tl.weights_version if tl is not None else 0

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
        wait = max(tl.last_push, tl.last_check) + MIN_PUSH_INTERVAL - now
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
        tl.last_check = self._clock()
        new = compute_weights(self.loads(target))
        if not meaningful(tl.weights, new):
            return
        tl.weights = new
        tl.weights_version += 1
        tl.last_push = self._clock()
        log.debug("target %s: weights of %d endpoints changed", target, len(new))
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
            if self._expire(tl, now, target):
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
    def pick(
        self, target: Target, router: int, candidates: Sequence[BackendEndpoint], count: int
    ) -> list[BackendEndpoint]:
        """``count`` picks for Resolve with a load router: LEAST_REQUEST (power of two choices over the
        calls in flight of all clients), PEAK_EWMA (power of two choices over latency x (in flight + 1); an
        unknown latency counts as the mean of the candidates' known ones) or WEIGHTED (weighted rotation over
        the published weights, shared by every client of the target). Picks within one Resolve count as in
        flight for the next ones. Reads only the candidates' sums (no aggregate over all reports)."""
        if router == pb.WEIGHTED:
            return self._weighted(target, candidates, count)
        tl = self._targets.get(target)
        n = len(candidates)
        outs = [0] * n
        lats = [0.0] * n
        if tl is not None:  # (expired reports leave with the next sweep, within a second)
            index = tl.index
            for k, e in enumerate(candidates):
                i = index.get((e.ip, e.port))
                if i is not None:
                    outs[k], lats[k] = tl.load(i)
        if router == pb.LEAST_REQUEST:
            costs = [float(o) for o in outs]
            step = [1.0] * n
        else:
            known = [lat for lat in lats if lat > 0]
            default = sum(known) / len(known) if known else 1.0
            step = [lat if lat > 0 else default for lat in lats]
            costs = [lat * (o + 1) for lat, o in zip(step, outs, strict=True)]
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

    def _weighted(
        self, target: Target, candidates: Sequence[BackendEndpoint], count: int
    ) -> list[BackendEndpoint]:
        tl = self._targets.get(target)
        if tl is None:
            tl = self._targets[target] = _TargetLoad()
        weights = tl.weights
        key = tuple(((e.ip, e.port), weights.get((e.ip, e.port), 0)) for e in candidates)
        sched = tl.schedules.get(key)
        if sched is None:
            if len(tl.schedules) > 16:
                tl.schedules.clear()
            sched = tl.schedules[key] = pb.weighted_schedule([w for _, w in key])
        start = tl.rr
        tl.rr = start + count
        return [candidates[sched[(start + i) % len(sched)]] for i in range(count)]
