"""One long-lived channel per backend address, with in-flight accounting so left addresses close cleanly.

One implementation serves sync ``grpc`` and ``grpc.aio`` channels: only the factory and closer differ.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

ChannelT = TypeVar("ChannelT")
#: Most retired addresses whose picks are kept one by one (the rest are summed under RETIRED_OTHERS).
MAX_RETIRED = 1024
RETIRED_OTHERS = "(retired)"


class Slot(Generic[ChannelT]):
    """A pooled channel and its in-flight calls.

    ``acquire``/``release`` are lock-free on the hot path (list append/pop are atomic under the GIL); the
    lock is taken only once the slot is retired, to close the channel exactly once after its last call.
    """

    __slots__ = (
        "address",
        "channel",
        "retired",
        "closed",
        "_inflight",
        "_lock",
        "_closer",
        "_picks",
        "_pick",
    )

    def __init__(self, address: str, channel: ChannelT, closer: Callable[[ChannelT], None]) -> None:
        self.address = address
        self.channel = channel
        self.retired = False
        self.closed = False
        self._inflight: list[None] = []
        self._lock = threading.Lock()
        self._closer = closer
        # calls started on this slot, counted lock-free (next() on an itertools.count is atomic)
        self._picks = itertools.count()
        self._pick = self._picks.__next__

    @property
    def picks(self) -> int:
        """Calls started on this channel so far."""
        return int(repr(self._picks)[6:-1])

    @property
    def in_flight(self) -> int:
        """Calls started on this channel and not finished yet."""
        return len(self._inflight)

    def acquire(self) -> bool:
        """Count a call about to start; False if the channel is already closed (pick another slot)."""
        self._inflight.append(None)
        self._pick()
        if self.retired:
            with self._lock:
                if self.closed:
                    self._inflight.pop()
                    return False
        return True

    def release(self, _call: object = None) -> None:
        """Count a call finished (usable directly as a done callback); closes a retired, idle channel."""
        self._inflight.pop()
        if self.retired and not self._inflight:
            self._close_if_idle()

    def retire(self) -> None:
        """Stop handing out this channel; close it now if idle, else when its last call finishes."""
        self.retired = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        with self._lock:
            if self.closed or self._inflight:
                return
            self.closed = True
        log.debug("closing channel to %s", self.address)
        try:
            self._closer(self.channel)
        except Exception:  # closing must never fail a call
            log.exception("closing channel to %s failed", self.address)


class ChannelPool(Generic[ChannelT]):
    """Channels keyed by backend address, created on first use with the user's credentials and options."""

    def __init__(self, factory: Callable[[str], ChannelT], closer: Callable[[ChannelT], None]) -> None:
        self._factory = factory
        self._closer = closer
        self._slots: dict[str, Slot[ChannelT]] = {}
        self._lock = threading.Lock()
        self._closed = False
        #: Picks of the slots retired so far, by address (live slots count their own).
        self.retired_picks: Counter[str] = Counter()
        #: Bumped whenever slots are retired: per-method caches compare it to drop what they hold of them.
        self.generation = 0

    def _count_retired(self, slot: Slot[ChannelT]) -> None:
        """Keep a retired slot's picks; beyond :data:`MAX_RETIRED` addresses they go to ``"(retired)"`` so
        endpoint churn cannot grow the counters without bound."""
        picks = slot.picks
        if not picks:
            return
        key = slot.address
        if key not in self.retired_picks and len(self.retired_picks) >= MAX_RETIRED:
            key = RETIRED_OTHERS
        self.retired_picks[key] += picks

    def picks(self) -> dict[str, int]:
        """Calls started per address, over the pool's lifetime."""
        out = dict(self.retired_picks)
        for address, slot in list(self._slots.items()):
            out[address] = out.get(address, 0) + slot.picks
        return {a: n for a, n in out.items() if n}

    def get(self, address: str) -> Slot[ChannelT]:
        """The live slot for ``address``, creating its channel on first use."""
        slot = self._slots.get(address)
        if slot is not None:
            return slot
        with self._lock:
            if self._closed:
                raise ValueError("lookaside channel is closed")
            slot = self._slots.get(address)
            if slot is None:
                log.debug("opening channel to %s", address)
                slot = self._slots[address] = Slot(address, self._factory(address), self._closer)
            return slot

    def retire(self, addresses: Iterable[str]) -> None:
        """Forget these addresses; each channel closes once its in-flight calls finish."""
        with self._lock:
            slots = [s for a in addresses if (s := self._slots.pop(a, None)) is not None]
            for slot in slots:
                self._count_retired(slot)
            if slots:
                self.generation += 1
        for slot in slots:
            slot.retire()

    def addresses(self) -> set[str]:
        """Addresses with a live (not retired) channel."""
        return set(self._slots)

    def slots(self) -> dict[str, Slot[ChannelT]]:
        """A snapshot of the live slots by address."""
        return dict(self._slots)

    def close(self) -> list[ChannelT]:
        """Refuse new channels and return every live channel for the caller to close (sync or async)."""
        with self._lock:
            self._closed = True
            slots = list(self._slots.values())
            self._slots.clear()
            for slot in slots:
                self._count_retired(slot)
            self.generation += 1
        channels: list[ChannelT] = []
        for slot in slots:
            with slot._lock:
                if slot.closed:
                    continue
                slot.retired = slot.closed = True
            channels.append(slot.channel)
        return channels
