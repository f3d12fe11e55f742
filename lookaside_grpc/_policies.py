"""Routing policies: choose one endpoint of a set for a call; small and swappable.

``round_robin`` and ``random`` look at nothing but the set. The load-aware ones look at this client's own
view of each endpoint: ``least_request`` (power of two choices over the calls in flight, as Envoy's
least_request and gRPC's least_request_experimental, gRFC A48) and ``peak_ewma`` (power of two choices over
latency EWMA x (in flight + 1), as Finagle's ``PeakEwma.scala`` and Linkerd). Both are latency-aware in one
more way: of the two candidates, one whose mean latency is :data:`SLOW_FACTOR` times the other's is *slow*
and gets only probe calls, bounded in rate rather than in share: one at a time, the first
:data:`PROBE_INTERVAL` after it was found slow, each next one twice as long after while it stays slow, up to
:data:`PROBE_INTERVAL_MAX` (the backoff of Envoy's outlier ejection, ``base_ejection_time`` x ejections up
to ``max_ejection_time``, with a cap short enough to come back within seconds). A probe's answer replaces
the estimate; a fast one sends the next probe at once, and two fast answers in a row end the probation (as
Envoy's health checks' ``healthy_threshold``: one lucky sample on a busy host must not), so a backend that
is fast again regains its share one probe round trip after its next probe. A probe answering twice as fast
as the estimate but still slow brings the next one forward to :data:`PROBE_INTERVAL`.

Why: in-flight counts alone (Envoy's and gRPC's least_request) send a 7x slower backend a seventh of a fast
one's calls, and Finagle's cost (peak EWMA x (pending + 1)) sends the slow one a call whenever a fast one's
queue times its latency exceeds the slow one's latency: with one of three backends 20 ms slower at
concurrency 16 they left it 9-12 % of the calls, while p99 stays the slow one's as long as it gets over
1 %. Rate-bounded probes are at most 2 calls/s per client, 1 per 1.5 s once the backoff is at its cap.

``weighted`` rotates over the per-endpoint weights the lookaside computes from the load every client reports
(server-assisted, like gRPC's weighted_round_robin, gRFC A58, where the backends report). In-flight counts
are the channel pool's own (``Slot._inflight``), so the load-aware policies add no counter of their own;
latency is measured only for policies that ask for it (``needs_latency``).
"""

from __future__ import annotations

import abc
import itertools
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from lookaside_grpc import protocol
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._weights import weighted_schedule

#: Default decay time of the latency EWMA (seconds), as Linkerd's and Finagle's default.
DEFAULT_TAU = 10.0
#: ``peak_ewma``'s decay time: shorter than Finagle's 10 s, as on a busy host a stall every few seconds (a GC
#: pause, a descheduled process) otherwise holds a fast backend's estimate at the stall's latency.
PEAK_TAU = 2.0
#: Cost of an endpoint with calls in flight but no latency measured yet (Finagle's penalty): avoided until
#: its first answer, but still picked when every endpoint is unmeasured (then the least loaded wins).
PENALTY = 1e9
#: ``least_request``/``peak_ewma``: a candidate whose mean latency is this many times its partner's (and at
#: least :data:`SLOW_GAP` more) is slow: it gets probe calls only.
SLOW_FACTOR = 2.0
#: A slow endpoint stays slow (probe calls only) until its mean latency is under this many times its
#: partner's: the hysteresis keeps a 20 ms backend out while a loaded machine's queueing inflates the fast
#: ones' means to half of it.
SLOW_EXIT = 1.3
#: Seconds; latency differences below this never make a candidate slow (sub-millisecond noise).
SLOW_GAP = 0.002
#: Seconds from finding an endpoint slow to its first probe call (from one client; one probe in flight at a
#: time); each further probe while it stays slow comes twice as long after the previous one.
PROBE_INTERVAL = 0.5
#: Longest gap between two probes of a slow endpoint (seconds): one call per 1.5 s per client, 0.7 % even at
#: 100 calls/s (p99 needs under 1 %), and a backend that is fast again is back within this plus two probe
#: round trips: well inside 5 s even on a busy host.
PROBE_INTERVAL_MAX = 1.5
#: A probe answering this many times faster than the slow endpoint's estimate (yet not fast enough to end its
#: probation, e.g. one sample taken during a stall) brings the next probe forward to :data:`PROBE_INTERVAL`.
PROBE_BETTER = 2.0
#: Weight of one sample above the mean in the per-sample mean latency (about the last 50 calls); one below
#: weighs :data:`MEAN_ALPHA_DOWN` (the mean drops fast after a stall or a slow first call that connected).
MEAN_ALPHA = 0.02
MEAN_ALPHA_DOWN = 0.1
#: A sample counts at most this many times the mean in it: a one-off stall (GC, a descheduled process)
#: moves the mean a little, a backend that turned slow still moves it all the way within a few dozen calls.
MEAN_CLIP = 2.0


class RoutingPolicy(abc.ABC):
    """Picks an endpoint from a non-empty set; must be thread-safe and cheap (it runs on every call)."""

    #: The lookaside ``Request.RouterType`` sent in ``per_call`` mode, where the lookaside picks.
    router_type: ClassVar[int] = protocol.ROUNDROBIN
    #: The name this policy is known by in ``channel(policy=...)``.
    name: ClassVar[str] = ""
    #: Whether calls must be timed and fed to :meth:`observe` (only then do channels time calls).
    needs_latency: ClassVar[bool] = False
    #: Whether the balancer reports this client's load to the lookaside (ReportLoad) periodically.
    reports_load: ClassVar[bool] = False
    #: The call metadata key this policy hashes (``ring_hash``): only then do calls look at their metadata
    #: and pick with :meth:`pick_hashed`; None = the policy ignores call metadata (calls pay nothing).
    hash_key: str | None = None

    @abc.abstractmethod
    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        """Return one of ``endpoints`` (never empty)."""

    def pick_hashed(self, endpoints: Sequence[Endpoint], request_hash: int | None) -> Endpoint:
        """Pick for a call whose ``hash_key`` metadata value hashed to ``request_hash`` (None: the call has
        none); only called when :attr:`hash_key` is set."""
        return self.pick(endpoints)

    def bind(self, pool: Any) -> None:  # noqa: B027 - optional hook
        """Called once by the balancer with its channel pool, whose slots count the calls in flight per
        address (a policy instance serves one balancer)."""

    def observe(self, address: str, seconds: float) -> None:  # noqa: B027 - optional hook
        """A call to ``address`` completed after ``seconds`` (only called when ``needs_latency``)."""

    def latency_ms(self, address: str) -> float:
        """This client's latency estimate for ``address`` in milliseconds; 0 = not measured."""
        return 0.0

    def retain(self, addresses: set[str]) -> None:  # noqa: B027 - optional hook
        """The endpoint set changed to ``addresses``: per-address state of the others may be dropped."""


class RoundRobin(RoutingPolicy):
    """Cycles through the set in order from a random start (so many fresh clients making one call each
    spread like one long-lived client); lock-free (``next()`` on an itertools.count is atomic)."""

    router_type = protocol.ROUNDROBIN
    name = "round_robin"

    def __init__(self, start: int | None = None) -> None:
        first = random.randrange(1 << 30) if start is None else start
        self._next = itertools.count(first).__next__

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        return endpoints[self._next() % len(endpoints)]


class Random(RoutingPolicy):
    """Picks uniformly at random."""

    router_type = protocol.RANDOM
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._choice = random.Random(seed).choice

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        return self._choice(endpoints)


class Ewma:
    """Peak-sensitive, time-decayed moving average of latency (Finagle's PeakEwma).

    ``value(now) = cost * exp(-(now - stamp) / tau)``: idle time decays the estimate toward 0 (so an endpoint
    not used for a while gets probed again); a sample above the current value replaces it at once (peak),
    a lower one is blended in with weight ``1 - exp(-elapsed / tau)``.
    """

    __slots__ = ("cost", "mean", "stamp", "tau", "_clock")

    def __init__(self, tau: float = DEFAULT_TAU, clock: Callable[[], float] = time.monotonic) -> None:
        self.cost = 0.0
        #: Per-sample moving average of clipped samples (:data:`MEAN_ALPHA`, :data:`MEAN_CLIP`,
        #: :data:`MEAN_ALPHA_DOWN`): what the slow test compares, as it forgets a one-off spike after a few
        #: calls, not after about tau.
        self.mean = 0.0
        self.tau = tau
        self._clock = clock
        self.stamp = clock()

    def value(self, now: float | None = None) -> float:
        """The estimate at ``now`` (default: the clock)."""
        if now is None:
            now = self._clock()
        return self.cost * math.exp(-max(0.0, now - self.stamp) / self.tau)

    def observe(self, sample: float, now: float | None = None) -> None:
        """Feed one latency sample (seconds)."""
        if now is None:
            now = self._clock()
        w = math.exp(-max(0.0, now - self.stamp) / self.tau)
        decayed = self.cost * w
        self.cost = sample if sample > decayed else decayed + sample * (1.0 - w)
        self.stamp = now
        mean = self.mean
        if mean == 0.0:
            self.mean = sample
        elif sample > mean:
            self.mean = mean + (min(sample, mean * MEAN_CLIP) - mean) * MEAN_ALPHA
        else:
            self.mean = mean + (sample - mean) * MEAN_ALPHA_DOWN

    def reset(self, sample: float, now: float | None = None) -> None:
        """Take ``sample`` as the whole estimate (a probe's answer)."""
        self.cost = self.mean = sample
        self.stamp = self._clock() if now is None else now


def _inflight(slots: dict[str, Any], address: str) -> int:
    slot = slots.get(address)
    return len(slot._inflight) if slot is not None else 0


class _LatencyTracking(RoutingPolicy):
    """Keeps a peak EWMA of the latency per address (fed by the channels' call timing)."""

    needs_latency = True

    def __init__(self, tau: float = DEFAULT_TAU, clock: Callable[[], float] = time.monotonic) -> None:
        self.tau = tau
        self._clock = clock
        self._ewma: dict[str, Ewma] = {}

    def observe(self, address: str, seconds: float) -> None:
        e = self._ewma.get(address)
        if e is None:
            e = self._ewma.setdefault(address, Ewma(self.tau, self._clock))
        e.observe(seconds)  # concurrent samples may race: one can be lost, which an average tolerates

    def latency_ms(self, address: str) -> float:
        e = self._ewma.get(address)
        return e.value() * 1000.0 if e is not None else 0.0

    def retain(self, addresses: set[str]) -> None:
        for a in [a for a in self._ewma if a not in addresses]:
            self._ewma.pop(a, None)


class LeastRequest(_LatencyTracking):
    """Power of two choices over this client's calls in flight (Envoy's least_request): two distinct
    endpoints at random, the one with fewer calls in flight wins (ties: the first). Lock-free.

    Latency-aware: a candidate :data:`SLOW_FACTOR` times slower than the other (mean latency) loses unless
    a probe of it is due (see :meth:`_slow_choice`).
    """

    router_type = protocol.LEAST_REQUEST
    name = "least_request"

    def __init__(
        self,
        seed: int | None = None,
        tau: float = DEFAULT_TAU,
        clock: Callable[[], float] = time.monotonic,
        probe_interval: float = PROBE_INTERVAL,
        probe_interval_max: float = PROBE_INTERVAL_MAX,
    ) -> None:
        _LatencyTracking.__init__(self, tau, clock)
        self._random = random.Random(seed).random
        self._slots: dict[str, Any] = {}
        self.probe_interval = probe_interval
        self.probe_interval_max = max(probe_interval, probe_interval_max)
        #: address -> when its next probe may go, for the endpoints found slow (its keys: the slow ones)
        self._probe_at: dict[str, float] = {}
        #: address -> the gap before the probe after that one (doubles per probe up to the cap)
        self._probe_gap: dict[str, float] = {}
        #: addresses with a probe in flight: the next answer replaces the estimate
        self._probing: set[str] = set()
        #: slow addresses whose last probe answer has not been judged yet
        self._answered: set[str] = set()
        #: slow addresses found fast enough once: the next probe goes at once, and if it is fast too they
        #: are no longer slow (two in a row, as Envoy's health checks' ``healthy_threshold``)
        self._passed: set[str] = set()
        self._probe_lock = threading.Lock()  # taken only when a probe looks due or answered (rarely)

    def bind(self, pool: Any) -> None:
        self._slots = pool._slots  # the live dict: in-flight counts are read per pick, never copied

    def _two(self, endpoints: Sequence[Endpoint]) -> tuple[Endpoint, Endpoint]:
        n = len(endpoints)
        r = self._random
        i = int(r() * n)
        j = int(r() * (n - 1))
        if j >= i:
            j += 1
        return endpoints[i], endpoints[j]

    def _slow_choice(self, a: Endpoint, b: Endpoint) -> Endpoint | None:
        """If one candidate is slow next to the other: the other one, or the slow one when a probe of it is
        due (none of this client's calls in flight on it and its probe time reached); None when neither is
        slow (or either is unmeasured). Found slow: first probe :attr:`probe_interval` later, then gaps
        doubling up to :attr:`probe_interval_max`; no longer slow once two probe answers in a row were fast
        enough (see :meth:`_judge`): then that state is dropped."""
        ewma = self._ewma
        ea = ewma.get(a.address)
        if ea is None:
            return None
        eb = ewma.get(b.address)
        if eb is None:
            return None
        la, lb = ea.mean, eb.mean
        probe_at = self._probe_at
        if probe_at and (a.address in probe_at) is not (b.address in probe_at):
            # one is on probation: it stays the one judged, even after a first answer below its partner's
            slow, fast, ls, lf = (a, b, la, lb) if a.address in probe_at else (b, a, lb, la)
        elif la >= lb:
            slow, fast, ls, lf = a, b, la, lb
        else:
            slow, fast, ls, lf = b, a, lb, la
        address = slow.address
        due = probe_at.get(address)
        fast_enough = ls < lf * (SLOW_FACTOR if due is None else SLOW_EXIT) or ls - lf < SLOW_GAP
        if due is None:
            if fast_enough:
                return None  # the common case: neither is slow
            with self._probe_lock:  # just found slow: its first probe one interval from now
                if address not in probe_at:
                    probe_at[address] = self._clock() + self.probe_interval
                    self._probe_gap[address] = self.probe_interval
            return fast
        now = self._clock()
        if address in self._answered or (fast_enough and address not in self._passed):
            if self._judge(address, fast_enough, now):
                return None
            due = probe_at.get(address, math.inf)
        if now >= due and not _inflight(self._slots, address):
            with self._probe_lock:  # one thread sends the probe
                if now >= probe_at.get(address, math.inf):
                    gap = self._probe_gap.get(address, self.probe_interval)
                    gap = self._probe_gap[address] = min(gap * 2.0, self.probe_interval_max)
                    probe_at[address] = now + gap
                    self._probing.add(address)
                    return slow
        return fast

    def _judge(self, address: str, fast_enough: bool, now: float) -> bool:
        """A slow endpoint's latest probe answer (or, between answers, a partner that got as slow as it):
        True when it ends the probation (fast enough, and the check before was too); a first pass brings
        the next probe forward to now; a slow answer clears the pass. One sample on a busy host can be
        lucky: two in a row rarely are."""
        with self._probe_lock:
            answered = address in self._answered
            self._answered.discard(address)
            if address not in self._probe_at:
                return True  # ended by another thread
            if not fast_enough:
                self._passed.discard(address)
                return False
            if address in self._passed:
                if not answered:
                    return False  # waiting for the confirming probe
                self._drop(address)
                return True
            self._passed.add(address)
            self._probe_at[address] = min(self._probe_at[address], now)
            return False

    def _drop(self, address: str) -> None:
        """Forget ``address``'s probation (under the probe lock)."""
        self._probe_at.pop(address, None)
        self._probe_gap.pop(address, None)
        self._passed.discard(address)
        self._answered.discard(address)

    def observe(self, address: str, seconds: float) -> None:
        if self._probing and address in self._probing:
            self._probing.discard(address)
            e = self._ewma.get(address)
            if e is not None:
                if seconds * PROBE_BETTER <= e.mean:
                    self._probe_sooner(address)
                e.reset(seconds)  # a probe's answer is the news: slow again or fast again, at once
                self._answered.add(address)  # judged at the next pick that draws it
                return
        _LatencyTracking.observe(self, address, seconds)

    def _probe_sooner(self, address: str) -> None:
        """A probe answered much faster than the estimate it replaces, yet maybe not fast enough to leave
        the slow ones (one sample on a busy host): the next probe goes :attr:`probe_interval` from now and
        the backoff starts over, instead of waiting out a gap of up to :attr:`probe_interval_max`."""
        with self._probe_lock:
            due = self._probe_at.get(address)
            if due is not None:
                self._probe_at[address] = min(due, self._clock() + self.probe_interval)
                self._probe_gap[address] = self.probe_interval

    def retain(self, addresses: set[str]) -> None:
        _LatencyTracking.retain(self, addresses)
        with self._probe_lock:
            for a in [a for a in self._probe_at if a not in addresses]:
                self._drop(a)
            self._probing.intersection_update(addresses)

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        if len(endpoints) < 2:
            return endpoints[0]
        a, b = self._two(endpoints)
        chosen = self._slow_choice(a, b)
        if chosen is not None:
            return chosen
        slots = self._slots
        return b if _inflight(slots, b.address) < _inflight(slots, a.address) else a


class PeakEwma(LeastRequest):
    """Power of two choices over cost = latency EWMA x (calls in flight + 1) (Finagle/Linkerd peak EWMA).

    ``tau`` is the EWMA decay time; ``clock`` is injectable for tests. An endpoint never measured costs 0
    when idle (so it gets a first call) and :data:`PENALTY` while that call is in flight. A slow candidate
    gets probes only, as with ``least_request``.
    """

    router_type = protocol.PEAK_EWMA
    name = "peak_ewma"

    def __init__(
        self,
        tau: float = PEAK_TAU,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        probe_interval: float = PROBE_INTERVAL,
        probe_interval_max: float = PROBE_INTERVAL_MAX,
    ) -> None:
        LeastRequest.__init__(self, seed, tau, clock, probe_interval, probe_interval_max)

    def cost(self, address: str, now: float | None = None) -> float:
        """The cost of sending one more call to ``address``."""
        pending = _inflight(self._slots, address)
        e = self._ewma.get(address)
        lat = e.value(now) if e is not None else 0.0
        if lat == 0.0:
            return PENALTY + pending if pending else 0.0
        return lat * (pending + 1)

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        if len(endpoints) < 2:
            return endpoints[0]
        a, b = self._two(endpoints)
        chosen = self._slow_choice(a, b)
        if chosen is not None:
            return chosen
        now = self._clock()
        return b if self.cost(b.address, now) < self.cost(a.address, now) else a


class Weighted(_LatencyTracking):
    """Weighted rotation over ``Endpoint.weight`` (published by the lookaside from the load all clients
    report; 0/absent = equal): a precomputed earliest-deadline-first schedule, rebuilt only when the set or
    its weights change, walked lock-free like round robin. Server-assisted: the balancer reports this
    client's in-flight calls and latency EWMA to the lookaside every second."""

    router_type = protocol.WEIGHTED
    name = "weighted"
    reports_load = True

    def __init__(
        self,
        tau: float = DEFAULT_TAU,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        super().__init__(tau, clock)
        # (the set the schedule is for, its (address, weight) key, the schedule)
        self._state: tuple[Sequence[Endpoint] | None, tuple[Any, ...], tuple[Endpoint, ...]] = (None, (), ())
        self._lock = threading.Lock()
        self._next = itertools.count(random.Random(seed).randrange(1 << 16)).__next__

    def _schedule(self, endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
        key = tuple((e.address, e.weight) for e in endpoints)
        with self._lock:
            state = self._state
            if state[1] == key:
                sched = state[2]
            else:
                sched = tuple(endpoints[i] for i in weighted_schedule([e.weight for e in endpoints]))
            self._state = (endpoints, key, sched)
        return sched

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        state = self._state
        sched = state[2] if state[0] is endpoints else self._schedule(endpoints)
        return sched[self._next() % len(sched)]


#: Slow start: default ramp window (seconds) of an endpoint that joins after the first set (Envoy's).
SLOW_START_WINDOW = 30.0
#: Slow start: the smallest fraction of a full share a new endpoint gets (Envoy's min_weight_percent 10 %).
SLOW_START_MIN = 0.1


class SlowStart(RoutingPolicy):
    """Wraps a policy so that an endpoint joining after the first (non-empty) set ramps up over ``window``
    seconds instead of taking a full share at once (Envoy's slow start): at ``t`` seconds after it joined it
    keeps a pick of the inner policy with probability ``max(min_weight, (t / window) ** (1 / aggression))``,
    otherwise the inner policy picks again among the endpoints not ramping. Nothing extra per call once no
    endpoint is ramping (one truth test). Build with :func:`with_slow_start`."""

    def __init__(
        self,
        inner: RoutingPolicy,
        window: float = SLOW_START_WINDOW,
        aggression: float = 1.0,
        min_weight: float = SLOW_START_MIN,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self.inner = inner
        self.window = window
        self.exponent = 1.0 / aggression
        self.min_weight = min_weight
        self._clock = clock
        self._random = random.Random(seed).random
        #: address -> when it joined, while it ramps (read per pick: empty = nothing to do)
        self.ramping: dict[str, float] = {}
        self._known: set[str] | None = None  # None until the first non-empty set

    def bind(self, pool: Any) -> None:
        self.inner.bind(pool)

    def observe(self, address: str, seconds: float) -> None:
        self.inner.observe(address, seconds)

    def latency_ms(self, address: str) -> float:
        return self.inner.latency_ms(address)

    def retain(self, addresses: set[str]) -> None:
        self.inner.retain(addresses)
        known = self._known
        if known is None:
            if addresses:
                self._known = set(addresses)  # the first set: no ramp (nothing to compare them with)
            return
        now = self._clock()
        ramping = dict(self.ramping)
        for a in addresses - known:
            ramping[a] = now
        for a in [a for a in ramping if a not in addresses]:
            del ramping[a]
        self._known = set(addresses)
        self.ramping = ramping  # swapped whole: pickers read it without a lock

    def factor(self, address: str, now: float | None = None) -> float:
        """The fraction of a full share ``address`` gets now (1.0 = not ramping)."""
        since = self.ramping.get(address)
        if since is None:
            return 1.0
        t = (self._clock() if now is None else now) - since
        if t >= self.window:
            return 1.0
        return max(self.min_weight, float((max(0.0, t) / self.window) ** self.exponent))

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        ep = self.inner.pick(endpoints)
        ramping = self.ramping
        if not ramping or ep.address not in ramping:
            return ep
        f = self.factor(ep.address)
        if f >= 1.0:
            if self._clock() - ramping.get(ep.address, 0.0) >= self.window:
                self.ramping = {a: t for a, t in ramping.items() if a != ep.address}  # done ramping
            return ep
        if self._random() < f:
            return ep
        others = [e for e in endpoints if e.address not in ramping]
        return self.inner.pick(others) if others else ep


def with_slow_start(policy: RoutingPolicy, window: float) -> SlowStart:
    """``policy`` wrapped in :class:`SlowStart`, keeping its name and flags."""
    cls = type(
        f"SlowStart_{type(policy).__name__}",
        (SlowStart,),
        {
            "name": policy.name,
            "router_type": policy.router_type,
            "needs_latency": policy.needs_latency,
            "reports_load": policy.reports_load,
        },
    )
    wrapped: SlowStart = cls(policy, window)
    return wrapped


#: Zone-aware routing: fewer endpoints than this in the set and every pick ignores zones (Envoy's
#: min_cluster_size).
ZONE_MIN_ENDPOINTS = 6


def zone_split(
    endpoints: Sequence[Endpoint], zone: str
) -> tuple[tuple[Endpoint, ...], tuple[Endpoint, ...], float]:
    """(local endpoints, spill-over endpoints, fraction of picks to keep local) for a client in ``zone``.

    EndpointSlice hints first: when every endpoint carries ``for_zones``, the endpoints hinted for ``zone``
    take every pick (Kubernetes' topology-aware routing). Otherwise Envoy's zone-aware rule, with clients
    assumed spread evenly over the zones that have endpoints (the client knows no other client): the local
    zone's expected share of the traffic is ``1 / zones``; while its share of the endpoints is at least
    that, every pick stays local; below it, ``endpoint share / expected share`` of the picks stay local and
    the rest go to the zones with endpoints to spare, so that no local endpoint gets more than an even
    share. No zone, no local endpoint or fewer than :data:`ZONE_MIN_ENDPOINTS` endpoints: zones are ignored.
    """
    everything: tuple[Endpoint, ...] = tuple(endpoints)
    if not zone:
        return everything, (), 1.0
    if all(e.for_zones for e in endpoints):
        hinted = tuple(e for e in endpoints if zone in e.for_zones)
        return (hinted, (), 1.0) if hinted else (everything, (), 1.0)
    n = len(endpoints)
    if n < ZONE_MIN_ENDPOINTS:
        return everything, (), 1.0
    per_zone: dict[str, int] = {}
    for e in endpoints:
        per_zone[e.zone] = per_zone.get(e.zone, 0) + 1
    local_n = per_zone.get(zone, 0)
    if not local_n:
        return everything, (), 1.0
    expected = 1.0 / len(per_zone)
    have = local_n / n
    local = tuple(e for e in endpoints if e.zone == zone)
    if have >= expected:
        return local, (), 1.0
    spare = {z for z, k in per_zone.items() if z != zone and k / n > expected}
    spill = tuple(e for e in endpoints if e.zone in spare) or tuple(e for e in endpoints if e.zone != zone)
    return local, spill, have / expected


class ZoneAware(RoutingPolicy):
    """Wraps a policy: picks stay in the client's ``zone`` as :func:`zone_split` says (its split is computed
    once per endpoint set, so a pick costs an identity test and, while spilling over, a random draw)."""

    def __init__(self, inner: RoutingPolicy, zone: str, seed: int | None = None) -> None:
        self.inner = inner
        self.zone = zone
        self._random = random.Random(seed).random
        self._split: tuple[Sequence[Endpoint] | None, tuple[Endpoint, ...], tuple[Endpoint, ...], float] = (
            None,
            (),
            (),
            1.0,
        )

    def bind(self, pool: Any) -> None:
        self.inner.bind(pool)

    def observe(self, address: str, seconds: float) -> None:
        self.inner.observe(address, seconds)

    def latency_ms(self, address: str) -> float:
        return self.inner.latency_ms(address)

    def retain(self, addresses: set[str]) -> None:
        self.inner.retain(addresses)

    def split(
        self, endpoints: Sequence[Endpoint]
    ) -> tuple[tuple[Endpoint, ...], tuple[Endpoint, ...], float]:
        """The split for this set (cached for the last set seen)."""
        state = self._split
        if state[0] is not endpoints:
            local, spill, keep = zone_split(endpoints, self.zone)
            state = self._split = (endpoints, local, spill, keep)
        return state[1], state[2], state[3]

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        state = self._split
        if state[0] is not endpoints:
            self.split(endpoints)
            state = self._split
        if state[3] >= 1.0 or self._random() < state[3]:
            return self.inner.pick(state[1])
        return self.inner.pick(state[2])


def with_zone(policy: RoutingPolicy, zone: str) -> ZoneAware:
    """``policy`` wrapped in :class:`ZoneAware`, keeping its name and flags."""
    cls = type(
        f"ZoneAware_{type(policy).__name__}",
        (ZoneAware,),
        {
            "name": policy.name,
            "router_type": policy.router_type,
            "needs_latency": policy.needs_latency,
            "reports_load": policy.reports_load,
        },
    )
    wrapped: ZoneAware = cls(policy, zone)
    return wrapped


POLICIES: dict[str, type[RoutingPolicy]] = {
    "round_robin": RoundRobin,
    "random": Random,
    "least_request": LeastRequest,
    "peak_ewma": PeakEwma,
    "weighted": Weighted,
}

from lookaside_grpc._ring_hash import RingHash  # noqa: E402 - it subclasses RoutingPolicy (above)

POLICIES["ring_hash"] = RingHash

from lookaside_grpc._wrr import WeightedRoundRobin  # noqa: E402 - it subclasses RoutingPolicy (above)

POLICIES["weighted_round_robin"] = WeightedRoundRobin


def resolve_policy(policy: str | RoutingPolicy) -> RoutingPolicy:
    """Turn a policy name (see :data:`POLICIES`) or instance into an instance."""
    if isinstance(policy, RoutingPolicy):
        return policy
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(f"unknown policy {policy!r}; expected one of {sorted(POLICIES)}") from None
