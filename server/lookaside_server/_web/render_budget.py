"""A budget for the expensive HTTP answers (``/``, ``/status.json``, ``/metrics``): what scraping them can
cost the event loop that also serves gRPC is bounded, whoever scrapes and however often.

* Concurrent requests for the same rendering share one render (single flight).
* Each rendering (a key: the page, or the format and filter asked of /metrics) has a token bucket of fresh
  renders, ``rate`` per second with a burst of as many, and all keys together have one of four times that.
  A request over either budget gets the newest rendering of its key again, with an ``Age`` header saying
  how old it is, or 429 with ``Retry-After`` if there is none yet; both count an ``http_render_budget``
  limit hit. Until the budget is spent every request gets a fresh rendering, so a person or a test polling
  a few times a second sees every change at once; a scraper hammering back to back sees one at most every
  ``1 / rate`` seconds, and varying the query string buys no more renders.
* At most ``max_keys`` renderings are kept (least recently used dropped first).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, replace

from lookaside_server._core.token_bucket import TokenBucket
from lookaside_server._web.http import HTTP_RENDER_BUDGET, HttpResponse

#: Fresh renders per second per rendering (and the burst).
DEFAULT_RATE = 4.0
#: Renderings kept at most.
MAX_KEYS = 16


@dataclass
class _Entry:
    bucket: TokenBucket
    response: HttpResponse | None = None
    rendered_at: float = 0.0
    inflight: asyncio.Task[HttpResponse] | None = None


class RenderBudget:
    """Single-flight renders with a per-rendering token bucket; see the module docstring."""

    def __init__(
        self,
        rate: float = DEFAULT_RATE,
        max_keys: int = MAX_KEYS,
        on_limit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number of renders per second, got {rate!r}")
        self.rate = rate
        self.burst = max(1.0, rate)
        self.max_keys = max_keys
        self._on_limit = on_limit
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._total = TokenBucket(4 * rate, 4 * self.burst, clock())
        #: Requests answered with an earlier rendering (also counted through ``on_limit``).
        self.reused = 0

    def _entry(self, key: Hashable, now: float) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(TokenBucket(self.rate, self.burst, now))
            while len(self._entries) > self.max_keys:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
            entry.bucket.refill(now)
        return entry

    async def get(self, key: Hashable, render: Callable[[], Awaitable[HttpResponse]]) -> HttpResponse:
        """The response for ``key``: a fresh ``render()`` within the budget, else the newest one again."""
        now = self._clock()
        entry = self._entry(key, now)
        if entry.inflight is not None:
            return await asyncio.shield(entry.inflight)
        self._total.refill(now)
        if entry.bucket.tokens < 1.0 or self._total.tokens < 1.0:
            self.reused += 1
            if self._on_limit is not None:
                self._on_limit(HTTP_RENDER_BUDGET)
            if entry.response is None:
                return HttpResponse(
                    429,
                    b"too many requests for this rendering; try again shortly\n",
                    headers={"Retry-After": "1"},
                )
            age = str(int(now - entry.rendered_at))
            return replace(entry.response, headers={**entry.response.headers, "Age": age})
        entry.bucket.tokens -= 1.0
        self._total.tokens -= 1.0
        # A task of its own: a requester that goes away does not cancel the render the others wait for.
        task = asyncio.get_running_loop().create_task(self._render(entry, now, render))
        entry.inflight = task
        return await asyncio.shield(task)

    @staticmethod
    async def _render(
        entry: _Entry, now: float, render: Callable[[], Awaitable[HttpResponse]]
    ) -> HttpResponse:
        try:
            response = await render()
        finally:
            entry.inflight = None
        if response.status == 200:
            entry.response, entry.rendered_at = response, now
        return response
