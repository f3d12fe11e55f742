"""A token bucket: ``rate`` tokens a second, at most ``burst`` (the HTTP render budget and the per-IP
ReportLoad rate)."""

from __future__ import annotations


class TokenBucket:
    """Starts full at ``now``; :meth:`take` spends one token if there is one."""

    __slots__ = ("rate", "burst", "tokens", "refilled_at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.refilled_at = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.refilled_at) * self.rate)
        self.refilled_at = now

    def take(self, now: float) -> bool:
        """Refill to ``now``, then spend one token; False (nothing spent) if there is none."""
        self.refill(now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def full(self, now: float) -> bool:
        """Whether the bucket would be full at ``now`` (nothing spent recently: safe to forget)."""
        return self.tokens + (now - self.refilled_at) * self.rate >= self.burst
