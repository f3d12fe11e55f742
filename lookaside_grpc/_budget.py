"""Retry budget: retries limited to a fraction of the calls, as Envoy's and Linkerd's retry budgets.

A call that fails ``UNAVAILABLE`` before any response is retried once on another endpoint (see the call
engine); without a limit an outage of half the pods doubles the calls the other half receive. The budget
allows, over a sliding window (default 10 s), ``ratio`` x the calls started in it (default 20 %) plus
``min_per_second`` x the window (default 10 a second, so that a client making few calls can still retry a
few) retries. Calls are not counted here: the budget reads the balancer's per-endpoint pick counters (which
exist anyway) at the retry decision only, so a call that is not retried costs nothing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

#: Budget marks kept per window (one per window / MARKS seconds at most).
MARKS = 10


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """The retry budget option (``channel(retry_budget=...)``; None = no budget, every eligible call retries).

    ``ratio``: retries allowed per call started in the window (Envoy's ``budget_percent`` / Linkerd's
    ``retryRatio``); ``min_per_second``: retries allowed per second of the window on top (Linkerd's
    ``minRetriesPerSecond``); ``window``: seconds (Linkerd's ``ttl``).
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0

    def __post_init__(self) -> None:
        if not self.ratio >= 0 or not self.min_per_second >= 0 or not self.window > 0:
            raise ValueError(f"invalid retry budget {self!r}: ratio, min_per_second >= 0 and window > 0")


DEFAULT_RETRY_BUDGET = RetryBudget()


class Budget:
    """One balancer's budget state. ``calls()`` returns the calls started so far (retries included)."""

    def __init__(
        self, config: RetryBudget, calls: Callable[[], int], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._calls = calls
        self._clock = clock
        self._lock = threading.Lock()
        #: retries granted / refused so far
        self.retries = 0
        self.exhausted = 0
        # (time, calls so far, retries so far), one per window / MARKS at most, taken at retry decisions;
        # the base of the window is the newest one at least a window old
        self._marks: deque[tuple[float, int, int]] = deque([(clock(), 0, 0)])

    def withdraw(self) -> bool:
        """May one more call be retried now? (Counts the retry when it may.)"""
        cfg = self.config
        window = cfg.window
        with self._lock:
            now = self._clock()
            calls = self._calls()
            marks = self._marks
            if now - marks[-1][0] >= window / MARKS:
                marks.append((now, calls, self.retries))
            while len(marks) > 1 and marks[1][0] <= now - window:
                marks.popleft()
            t0, calls0, retries0 = marks[0]
            retries = self.retries - retries0
            first_calls: float = max(0, calls - calls0 - retries)  # a retry is a call on the pool too
            span = now - t0
            if span > window:  # no retry decision for a while: the calls' mean rate over the window
                first_calls = first_calls * window / span
            if retries + 1 > cfg.ratio * first_calls + cfg.min_per_second * window:
                self.exhausted += 1
                return False
            self.retries += 1
            return True
