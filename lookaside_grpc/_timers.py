"""One timer thread for the whole process: ejection cool-downs and staleness deadlines are heap entries,
not a ``threading.Timer`` (a thread) each, so thousands of ejected addresses add no threads."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Handle:
    """A scheduled callback; :meth:`cancel` before it runs and it never will."""

    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Scheduler:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Handle]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, fn: Callable[[], None]) -> Handle:
        handle = Handle(time.monotonic() + max(0.0, delay), fn)
        with self._cond:
            heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lookaside-timers", daemon=True)
                self._thread.start()
            self._cond.notify()
        return handle

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        # idle: the thread ends after a while without timers (restarted on demand)
                        if not self._cond.wait(30.0) and not self._heap:
                            self._thread = None
                            return
                        continue
                    left = self._heap[0][0] - time.monotonic()
                    if left <= 0:
                        handle = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(left)
            if handle.cancelled:
                continue
            try:
                handle.fn()
            except Exception:  # a timer callback must never stop the others
                log.exception("timer callback failed")

    def pending(self) -> int:
        with self._cond:
            return sum(1 for _, _, h in self._heap if not h.cancelled)


_scheduler = _Scheduler()


def call_later(delay: float, fn: Callable[[], None]) -> Handle:
    """Run ``fn`` on the process's timer thread after ``delay`` seconds (keep it short and non-blocking)."""
    return _scheduler.call_later(delay, fn)


def pending() -> int:
    """Timers scheduled and not cancelled (for tests)."""
    return _scheduler.pending()
