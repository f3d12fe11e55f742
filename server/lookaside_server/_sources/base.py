"""The endpoint source interface: where endpoint sets come from (a static file now, Kubernetes later)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from lookaside_server._core.model import Endpoints, Target

#: Called by a source, on the event loop thread, with a target's full current state (None: target gone).
Publish = Callable[[Target, Endpoints | None], None]


class TargetNotFound(LookupError):
    """Raised by :meth:`EndpointSource.subscribe` when the target does not exist."""

    def __init__(self, target: Target) -> None:
        super().__init__(f"target {target} not found")
        self.target = target


class TooManyTargets(RuntimeError):
    """Raised by :meth:`EndpointSource.subscribe` when the source already tracks as many targets as it may."""

    def __init__(self, target: Target, limit: int) -> None:
        super().__init__(
            f"target {target} not tracked: this server already tracks its maximum of {limit} "
            "targets (--max-targets)"
        )
        self.target = target
        self.limit = limit


class SourceUnavailable(RuntimeError):
    """Raised by :meth:`EndpointSource.subscribe` when the source cannot answer now (e.g. its API is down)."""


class EndpointSource(ABC):
    """Supplies endpoint sets per target, lazily (subscribed on first use) and pushing changes.

    Contract: every call happens on the server's event loop; ``publish`` must only be called on that loop
    (a source running blocking watches in threads hands updates over with ``loop.call_soon_threadsafe``).
    ``subscribe`` must call ``publish`` with the target's initial state before it returns; afterwards the
    source publishes the full state on every change, and None if the target disappears (it may publish
    again if it comes back, until ``unsubscribe``). Publishing an unchanged state is allowed and harmless.
    """

    #: Seconds after which the registry unsubscribes a target nobody resolved or watched (None: never).
    idle_timeout: float | None = None

    @abstractmethod
    async def start(self, publish: Publish) -> None:
        """Start the source; ``publish`` receives every state update. Raise if the source is unusable."""

    @abstractmethod
    async def subscribe(self, target: Target) -> None:
        """Track ``target`` and publish its initial state; raise :class:`TargetNotFound` if absent."""

    @abstractmethod
    async def unsubscribe(self, target: Target) -> None:
        """Stop tracking ``target``; no further publishes for it are needed."""

    @abstractmethod
    async def stop(self) -> None:
        """Release everything (threads, watches, tasks); no publish may happen afterwards."""

    def describe(self, target: Target) -> dict[str, str | int | float]:
        """Source-specific health of one target for status views (e.g. Kubernetes watch state)."""
        return {}
