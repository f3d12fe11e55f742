"""Per-target endpoint state with versions, lazy subscription through the source, and Watch fan-out.

Watchers get a conflating "latest" slot plus an Event: a slow watcher only ever skips to the newest
state, it never blocks the registry, the source or other watchers, and memory stays bounded.

Fan-out to many watchers is spread over loop iterations: a change wakes at most :data:`FANOUT_BATCH`
watchers per iteration (the rest in later ones) and pauses after a batch that kept the loop busy, so RPCs on
other targets are served in between instead of waiting behind every watcher of a big target. Each
:class:`TargetState` carries a ``cache`` for what is derived from it once and shared by all its watchers
(the Watch servicer keeps the encoded message there).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from lookaside_server._core.model import Endpoints, Target
from lookaside_server._sources.base import EndpointSource, TargetNotFound

log = logging.getLogger(__name__)

#: Watchers woken per event-loop iteration when a target changes (the rest in the following iterations).
FANOUT_BATCH = 16
#: A batch whose sends took the loop longer than this (seconds) is followed by a pause of twice as long (at
#: most FANOUT_MAX_PAUSE): sets of thousands of endpoints go out in about a third of the loop's time.
FANOUT_BUSY = 0.001
FANOUT_MAX_PAUSE = 0.02


@dataclass(frozen=True, slots=True)
class TargetState:
    """A target's endpoints (None: the target is gone) at a version; versions start at 1 and only grow.

    ``cache`` holds what consumers derive from this state once for all (e.g. the encoded Watch message per
    port); it lives and dies with the state."""

    target: Target
    endpoints: Endpoints | None
    version: int
    changed_at: float
    cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)


class Subscription:
    """One watcher's view of a target: holds only the latest unseen state (conflating)."""

    def __init__(self, registry: Registry, target: Target) -> None:
        self.target = target
        self._registry = registry
        self._latest: TargetState | None = None
        self._event = asyncio.Event()
        self._closed = False

    def offer(self, state: TargetState) -> None:
        """Replace the unseen state with ``state`` and wake the watcher; never blocks."""
        self._latest = state
        self._event.set()

    def resend(self, state: TargetState) -> None:
        """Wake the watcher to send ``state`` (the last one it got) again, e.g. with new load weights, unless
        a newer state is already waiting (it goes out with the new weights anyway)."""
        if self._latest is None:
            self.offer(state)

    def close(self) -> None:
        """End the subscription; :meth:`next` returns None from now on."""
        self._closed = True
        self._event.set()

    @property
    def closed(self) -> bool:
        """Whether the subscription has ended (server shutdown)."""
        return self._closed

    async def next(self) -> TargetState | None:
        """Wait for the next unseen state; None once closed."""
        while True:
            if self._closed:
                return None
            if self._latest is not None:
                state, self._latest = self._latest, None
                self._event.clear()
                return state
            self._event.clear()
            await self._event.wait()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._registry.leave(self)


@dataclass
class _Entry:
    state: TargetState
    watchers: set[Subscription] = field(default_factory=set)
    #: The task waking watchers batch by batch (None: none running).
    fanout: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class TargetStatus:
    """One row of the status view."""

    target: str
    endpoints: int
    ready: int
    version: int
    changed_at: float
    watchers: int


class Registry:
    """Holds the state of every subscribed target and notifies watchers when it actually changes."""

    def __init__(self, source: EndpointSource) -> None:
        self.source = source
        self._entries: dict[Target, _Entry] = {}
        self._pending: dict[Target, asyncio.Future[None]] = {}
        self._closed = False
        #: Monotonic time of each target's last Resolve/Watch or last watcher leaving (idle expiry).
        self._last_used: dict[Target, float] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def publish(self, target: Target, endpoints: Endpoints | None) -> None:
        """Source callback (on the loop): record a target's new state; bump the version only on change."""
        if self._closed:
            return
        entry = self._entries.get(target)
        now = time.time()
        if entry is None:
            if endpoints is not None:
                self._entries[target] = _Entry(TargetState(target, endpoints, 1, now))
            return
        if entry.state.endpoints == endpoints:
            return
        entry.state = TargetState(target, endpoints, entry.state.version + 1, now)
        log.info(
            "target %s changed: %s endpoint(s), version %d",
            target,
            "gone" if endpoints is None else len(endpoints),
            entry.state.version,
        )
        self._fan_out(entry, resend=False)

    def resend_all(self, target: Target) -> None:
        """Wake every watcher of ``target`` to send the current state again (e.g. with new load weights),
        except those with a newer state already waiting; spread over loop iterations like a change."""
        entry = self._entries.get(target)
        if entry is not None and not self._closed:
            self._fan_out(entry, resend=True)

    def _fan_out(self, entry: _Entry, resend: bool) -> None:
        """Offer the entry's state to its watchers: at once if they are few, else batch by batch in a task
        (replacing a fan-out still in progress: the newest state reaches everyone, conflated; a resend that
        interrupts a change's fan-out still reaches the watchers the change had not, as they hold nothing
        newer than what they sent)."""
        if entry.fanout is not None:
            entry.fanout.cancel()
            entry.fanout = None
        state = entry.state
        watchers = list(entry.watchers)
        if len(watchers) <= FANOUT_BATCH:
            for watcher in watchers:
                (watcher.resend if resend else watcher.offer)(state)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop (tests): no one to yield to
            for watcher in watchers:
                (watcher.resend if resend else watcher.offer)(state)
            return
        entry.fanout = loop.create_task(
            self._fan_out_batches(entry, state, watchers, resend),
            name=f"fan-out {state.target} v{state.version}",
        )

    @staticmethod
    async def _fan_out_batches(
        entry: _Entry, state: TargetState, watchers: list[Subscription], resend: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            for start in range(0, len(watchers), FANOUT_BATCH):
                if start:
                    began = loop.time()
                    await asyncio.sleep(0)  # the woken batch (and everything else ready) runs first
                    busy = loop.time() - began
                    if busy > FANOUT_BUSY:
                        # Big messages: sending them kept the loop (and the GIL) busy. Pause twice as long so
                        # grpc's poller thread and other RPCs get their turn, not only the next batch.
                        await asyncio.sleep(min(2 * busy, FANOUT_MAX_PAUSE))
                for watcher in watchers[start : start + FANOUT_BATCH]:
                    if not watcher.closed:
                        (watcher.resend if resend else watcher.offer)(state)
        finally:
            if entry.fanout is asyncio.current_task():
                entry.fanout = None

    async def get(self, target: Target) -> TargetState:
        """The current state of an existing target, subscribing on first use; raise TargetNotFound."""
        entry = self._entries.get(target)
        if entry is None:
            await self._subscribe(target)
            entry = self._entries.get(target)
            if entry is None:
                raise TargetNotFound(target)
        self._touch(target)
        if entry.state.endpoints is None:
            raise TargetNotFound(target)
        return entry.state

    async def watch(self, target: Target) -> Subscription:
        """Add a watcher to an existing target; its first :meth:`Subscription.next` is the current state."""
        state = await self.get(target)
        sub = Subscription(self, target)
        if self._closed:
            sub.close()
            return sub
        self._entries[target].watchers.add(sub)
        sub.offer(state)
        return sub

    def leave(self, sub: Subscription) -> None:
        """Remove a watcher (idempotent)."""
        entry = self._entries.get(sub.target)
        if entry is not None:
            entry.watchers.discard(sub)
            self._last_used[sub.target] = time.monotonic()

    def _touch(self, target: Target) -> None:
        """Record a use of ``target``; start the idle sweeper if the source wants idle targets dropped."""
        self._last_used[target] = time.monotonic()
        ttl = self.source.idle_timeout
        if ttl is not None and self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop(ttl), name="idle sweeper")

    async def _sweep_loop(self, ttl: float) -> None:
        while True:
            await asyncio.sleep(min(max(ttl / 4, 0.02), 30.0))
            try:
                await self.expire_idle(ttl)
            except Exception:  # noqa: BLE001 - the sweeper must keep going
                log.exception("idle sweep failed")

    async def expire_idle(self, ttl: float) -> list[Target]:
        """Unsubscribe and forget every target without watchers unused for ``ttl`` seconds; the next
        Resolve/Watch subscribes it afresh. Returns the expired targets."""
        cutoff = time.monotonic() - ttl
        idle = [
            t
            for t, entry in self._entries.items()
            if not entry.watchers and t not in self._pending and self._last_used.get(t, 0.0) <= cutoff
        ]
        expired: list[Target] = []
        for target in idle:
            entry = self._entries.get(target)
            if entry is None or entry.watchers or self._last_used.get(target, 0.0) > cutoff:
                continue  # used again while an earlier target was being unsubscribed
            del self._entries[target]
            expired.append(target)
            self._last_used.pop(target, None)
            log.info("target %s idle for %.0f s: unsubscribed", target, ttl)
            try:
                await self.source.unsubscribe(target)
            except Exception:  # noqa: BLE001 - forgetting it is what matters
                log.exception("unsubscribing idle target %s failed", target)
        return expired

    async def _subscribe(self, target: Target) -> None:
        while (pending := self._pending.get(target)) is not None:
            try:
                await asyncio.shield(pending)
                return
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this caller was cancelled
                # the caller doing the subscription was cancelled: try again ourselves
        if target in self._entries:
            return
        if self._closed:
            raise TargetNotFound(target)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[target] = fut
        try:
            await self.source.subscribe(target)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: concurrent callers re-raise it themselves
            raise
        else:
            fut.set_result(None)
            if target not in self._entries:
                log.warning("source subscribed %s without publishing its state; treating it as empty", target)
                self._entries[target] = _Entry(TargetState(target, (), 1, time.time()))
            log.info("subscribed target %s", target)
        finally:
            del self._pending[target]

    def close(self) -> None:
        """End every watcher (so Watch streams finish) and refuse further updates; idempotent."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for entry in self._entries.values():
            if entry.fanout is not None:
                entry.fanout.cancel()
                entry.fanout = None
            for watcher in entry.watchers:
                watcher.close()
            entry.watchers.clear()

    async def unsubscribe_all(self) -> None:
        """Unsubscribe every target from the source (on shutdown)."""
        for target in list(self._entries):
            try:
                await self.source.unsubscribe(target)
            except Exception:  # noqa: BLE001 - shutdown must go on
                log.exception("unsubscribing %s failed", target)

    def states(self) -> list[tuple[TargetState, int]]:
        """Every tracked target's current state and its number of watchers, sorted by target (on the loop)."""
        return [
            (entry.state, len(entry.watchers))
            for _, entry in sorted(self._entries.items(), key=lambda kv: str(kv[0]))
        ]

    def snapshot(self) -> list[TargetStatus]:
        """A status view: every subscribed target with endpoint counts, version, last change and watchers."""
        rows = []
        for target, entry in sorted(self._entries.items(), key=lambda kv: str(kv[0])):
            eps = entry.state.endpoints or ()
            ready = sum(1 for e in eps if e.ready)
            rows.append(
                TargetStatus(
                    str(target),
                    len(eps),
                    ready,
                    entry.state.version,
                    entry.state.changed_at,
                    len(entry.watchers),
                )
            )
        return rows
