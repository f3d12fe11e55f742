"""Local resilience shared by every mode and by channels and interceptors: endpoint ejection with exponential
cool-down and a panic threshold, the retry rule, and RLS-style adaptive throttling of Resolve calls."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable

import grpc
import grpc.aio

from lookaside_grpc import _timers
from lookaside_grpc._stats import Counters

log = logging.getLogger(__name__)

#: First cool-down of an ejected address; doubles on every new ejection, up to ``MAX_EJECTION``.
BASE_EJECTION = 1.0
MAX_EJECTION = 30.0
#: Never eject more than this fraction of the known endpoints (panic threshold): beyond it, keep them all.
MAX_EJECTED_FRACTION = 0.5


def retryable(err: object) -> bool:
    """UNAVAILABLE before any response byte (no initial metadata): connection refused or reset."""
    if not isinstance(err, grpc.Call | grpc.aio.AioRpcError):
        return False
    try:
        return err.code() is grpc.StatusCode.UNAVAILABLE and not err.initial_metadata()
    except Exception:  # a call object that cannot tell
        return False


class Ejector:
    """Addresses ejected from local picks after failing with UNAVAILABLE, each for a cool-down.

    ``ejected`` (a frozenset swapped atomically) is what pickers read; ``probation`` holds restored addresses
    whose backoff resets on their next success (pickers test ``if probation:`` - an empty dict - per call).
    Cool-downs are restored by the process's one timer thread (``_timers``), so nothing is checked per call
    and no thread is started per address.
    """

    def __init__(
        self,
        population: Callable[[], int],
        on_change: Callable[[frozenset[str]], None],
        counters: Counters,
        base: float = BASE_EJECTION,
        maximum: float = MAX_EJECTION,
        max_fraction: float = MAX_EJECTED_FRACTION,
        on_eject: Callable[[str], None] | None = None,
    ) -> None:
        self._population = population
        self._on_change = on_change
        self._on_eject = on_eject
        self._counters = counters
        self.base, self.maximum, self.max_fraction = base, maximum, max_fraction
        self.ejected: frozenset[str] = frozenset()
        self.probation: dict[str, bool] = {}
        self._cooldown: dict[str, float] = {}
        self._timers: dict[str, _timers.Handle] = {}
        self._lock = threading.Lock()
        self._closed = False

    def eject(self, address: str) -> bool:
        """Eject ``address`` for its next cool-down; False if the panic threshold forbids it."""
        with self._lock:
            if self._closed:
                return False
            if address in self.ejected:
                return True
            if len(self.ejected) + 1 > self._population() * self.max_fraction:
                log.info(
                    "not ejecting %s: %d of %d already ejected",
                    address,
                    len(self.ejected),
                    self._population(),
                )
                return False
            cool = self._cooldown.get(address, self.base)
            self._cooldown[address] = min(cool * 2, self.maximum)
            self.probation.pop(address, None)
            self.ejected = ejected = self.ejected | {address}
            self._timers[address] = _timers.call_later(cool, lambda: self._restore(address))
        log.warning("ejecting %s for %.1fs after UNAVAILABLE", address, cool)
        self._counters.ejection(address)
        self._on_change(ejected)
        if self._on_eject is not None:
            self._on_eject(address)
        return True

    def _restore(self, address: str) -> None:
        with self._lock:
            self._timers.pop(address, None)
            if self._closed or address not in self.ejected:
                return
            self.ejected = ejected = self.ejected - {address}
            self.probation[address] = True
        log.info("%s back in rotation after its cool-down", address)
        self._on_change(ejected)

    def forget(self, addresses: set[str]) -> None:
        """These addresses left the endpoint set: drop their cool-down state (bounded under churn)."""
        with self._lock:
            for a in addresses:
                self._cooldown.pop(a, None)
                self.probation.pop(a, None)

    def succeeded(self, address: str) -> None:
        """A call to ``address`` succeeded: a restored address gets its backoff reset."""
        if self.probation.pop(address, None):
            with self._lock:
                self._cooldown.pop(address, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timers = list(self._timers.values())
            self._timers.clear()
        for t in timers:
            t.cancel()


class AdaptiveThrottle:
    """Client-side adaptive throttling (Google SRE book; gRPC RLS): reject a request locally with probability
    ``max(0, (requests - k * accepts) / (requests + 1))`` over a sliding window."""

    def __init__(self, k: float = 2.0, window: float = 30.0, rng: random.Random | None = None) -> None:
        self.k, self.window = k, window
        self._events: deque[tuple[float, bool]] = deque()
        self._requests = 0
        self._accepts = 0
        self._lock = threading.Lock()
        self._random = (rng or random.Random()).random

    def _prune(self, now: float) -> None:
        cutoff = now - self.window
        events = self._events
        while events and events[0][0] < cutoff:
            _, ok = events.popleft()
            self._requests -= 1
            self._accepts -= ok

    def _add(self, now: float, ok: bool) -> None:
        self._events.append((now, ok))
        self._requests += 1
        self._accepts += ok

    def throttle(self) -> bool:
        """Whether to reject this request locally (a rejection counts as a request, not an accept)."""
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            p = max(0.0, (self._requests - self.k * self._accepts) / (self._requests + 1))
            if p > 0 and self._random() < p:
                self._add(now, False)
                return True
            return False

    def record(self, accepted: bool) -> None:
        """Record the outcome of a request that was sent."""
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            self._add(now, accepted)
