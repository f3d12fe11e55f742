"""``weighted_round_robin``: client-side weighted round robin over the load backends report themselves in
each call's trailers (ORCA, :mod:`lookaside_grpc.orca`), as gRPC's own policy of that name (gRFC A58).

An endpoint's weight is ``qps / (utilization + eps / qps * error_utilization_penalty)``, utilization being
the report's ``application_utilization`` if set, else its ``cpu_utilization``. A weight counts only after the
endpoint has reported one for ``blackout_period`` seconds (no churn from a fresh endpoint's first reports)
and stops counting ``weight_expiration_period`` seconds after its last report (then the blackout applies
again). Endpoints without a usable weight get the mean of the others'; with fewer than two weighted, every
endpoint weighs the same (round robin). The pick walks the smooth earliest-deadline-first schedule of
:func:`lookaside_grpc._weights.weighted_schedule`, rebuilt every ``weight_update_period`` seconds and when
the set changes, lock-free in between (like ``round_robin``).
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import grpc

from lookaside_grpc import protocol
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._weights import weighted_schedule
from lookaside_grpc.orca import load_report_of

#: gRFC A58's defaults (seconds; the penalty is a factor).
BLACKOUT_PERIOD = 10.0
WEIGHT_EXPIRATION_PERIOD = 180.0
WEIGHT_UPDATE_PERIOD = 1.0
MIN_WEIGHT_UPDATE_PERIOD = 0.1
ERROR_UTILIZATION_PENALTY = 1.0
#: Weights are scaled to integers up to this before :func:`weighted_schedule` normalizes them.
_SCALE = 1_000_000


class EndpointWeight:
    """One endpoint's weight and its two timestamps (gRFC A58's ``UpdateWeight`` / ``GetWeight``)."""

    __slots__ = ("weight", "non_empty_since", "last_updated")

    def __init__(self) -> None:
        self.weight = 0.0
        self.non_empty_since = math.inf
        self.last_updated = -math.inf

    def update(self, qps: float, eps: float, utilization: float, penalty: float, now: float) -> None:
        if utilization > 0 and qps > 0:
            utilization += eps / qps * penalty
        weight = 0.0 if utilization == 0 else qps / utilization
        if weight == 0:
            return
        if self.non_empty_since == math.inf:
            self.non_empty_since = now
        self.last_updated = now
        self.weight = weight

    def get(self, now: float, blackout: float, expiration: float) -> float:
        if now - self.last_updated >= expiration:
            self.non_empty_since = math.inf
            return 0.0
        if blackout > 0 and now - self.non_empty_since < blackout:
            return 0.0
        return self.weight


class WeightedRoundRobin(RoutingPolicy):
    """Weighted round robin over backend-reported load (ORCA per-call reports, gRFC A58); see the module
    docstring. Reads every call's trailing metadata (``wants_trailers``: the call engine fetches it only for
    such a policy). In ``per_call`` mode the lookaside picks (round robin)."""

    router_type = protocol.ROUNDROBIN
    name = "weighted_round_robin"
    #: The call engine hands every ended call's status and trailing metadata to :meth:`call_done`.
    wants_trailers = True

    def __init__(
        self,
        blackout_period: float = BLACKOUT_PERIOD,
        weight_expiration_period: float = WEIGHT_EXPIRATION_PERIOD,
        weight_update_period: float = WEIGHT_UPDATE_PERIOD,
        error_utilization_penalty: float = ERROR_UTILIZATION_PENALTY,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        if error_utilization_penalty < 0:
            raise ValueError("error_utilization_penalty must not be negative")
        if blackout_period < 0 or weight_expiration_period <= 0:
            raise ValueError("blackout_period must be >= 0 and weight_expiration_period > 0")
        self.blackout_period = float(blackout_period)
        self.weight_expiration_period = float(weight_expiration_period)
        self.weight_update_period = max(MIN_WEIGHT_UPDATE_PERIOD, float(weight_update_period))
        self.error_utilization_penalty = float(error_utilization_penalty)
        self._clock = clock
        self._weights: dict[str, EndpointWeight] = {}
        # (the set the schedule is for, when to rebuild it, the schedule, the weights it was made from)
        self._state: tuple[Sequence[Endpoint] | None, float, tuple[Endpoint, ...], tuple[int, ...]] = (
            None,
            0.0,
            (),
            (),
        )
        self._lock = threading.Lock()
        self._next = itertools.count(random.Random(seed).randrange(1 << 16)).__next__

    # -- feedback -------------------------------------------------------------------------------------------

    def call_done(
        self,
        address: str,
        seconds: float,
        code: grpc.StatusCode,
        trailing: Iterable[tuple[str, str | bytes]] | None,
    ) -> None:
        """A call to ``address`` ended: take the ORCA report of its trailers, if any (gRFC A58: a call
        without one changes nothing)."""
        report = load_report_of(trailing)
        if report is None:
            return
        qps = report.rps_fractional or float(report.rps)
        utilization = report.application_utilization or report.cpu_utilization
        w = self._weights.get(address)
        if w is None:
            w = self._weights.setdefault(address, EndpointWeight())
        w.update(qps, report.eps, utilization, self.error_utilization_penalty, self._clock())

    def retain(self, addresses: set[str]) -> None:
        """Endpoints that left lose their weight: one that comes back starts afresh (blackout included)."""
        for a in [a for a in self._weights if a not in addresses]:
            self._weights.pop(a, None)

    def weights(self, endpoints: Sequence[Endpoint], now: float | None = None) -> list[float]:
        """The weight each endpoint counts with now (0 = none usable: the mean of the others')."""
        now = self._clock() if now is None else now
        out: list[float] = []
        for e in endpoints:
            w = self._weights.get(e.address)
            out.append(0.0 if w is None else w.get(now, self.blackout_period, self.weight_expiration_period))
        return out

    # -- picking --------------------------------------------------------------------------------------------

    def _rebuild(self, endpoints: Sequence[Endpoint], now: float) -> tuple[Endpoint, ...]:
        weights = self.weights(endpoints, now)
        top = max(weights, default=0.0)
        known = sum(1 for w in weights if w > 0)
        if known < 2 or top <= 0:  # fewer than two weighted endpoints: round robin (gRFC A58)
            key: tuple[int, ...] = ()
        else:
            key = tuple(max(1, round(w / top * _SCALE)) if w > 0 else 0 for w in weights)
        state = self._state
        if state[0] is endpoints and state[3] == key:
            sched = state[2]  # same weights: keep walking the same schedule
        elif not key:
            sched = tuple(endpoints)
        else:
            sched = tuple(endpoints[i] for i in weighted_schedule(key))
        self._state = (endpoints, now + self.weight_update_period, sched, key)
        return sched

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        state = self._state
        sched = state[2]
        if state[0] is not endpoints or self._clock() >= state[1]:
            if self._lock.acquire(blocking=state[0] is not endpoints):
                try:
                    state = self._state
                    now = self._clock()
                    if state[0] is not endpoints or now >= state[1]:
                        sched = self._rebuild(endpoints, now)
                    else:
                        sched = state[2]
                finally:
                    self._lock.release()
        return sched[self._next() % len(sched)]
