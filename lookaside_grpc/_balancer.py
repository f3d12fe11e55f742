"""The per-target core: resolver + policy + channel pool + ejection + counters, shared by channels and
interceptors (one implementation): a balancer is created per (target, lookaside, mode, policy, port,
credentials, options...) and reused through ``acquire``/``release`` with reference counting."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from lookaside_grpc import protocol
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._health import AdaptiveThrottle, Ejector
from lookaside_grpc._policies import RoutingPolicy, resolve_policy
from lookaside_grpc._pool import ChannelPool
from lookaside_grpc._resolvers import (
    MODES,
    WATCH,
    AioPerCallResolver,
    AioResolver,
    AioWatchResolver,
    Mode,
    PerCallResolver,
    SyncResolver,
    Target,
    WatchResolver,
)
from lookaside_grpc._stats import Counters, Stats, track, untrack

log = logging.getLogger(__name__)

#: How long a call without its own timeout waits for the first endpoint set (or a Resolve).
DEFAULT_INIT_TIMEOUT = 10.0
#: How long the last endpoint set (or the last picks) keeps serving after the lookaside stopped confirming it.
#: Five minutes rides out a lookaside restart or upgrade comfortably, while bounding the risk of sending calls
#: to pod IPs Kubernetes has since reused for other pods. None = forever.
DEFAULT_MAX_STALENESS: float | None = 300.0

#: The lookaside channel reconnects quickly after a lookaside restart (grpc's default backoff grows to 120 s).
LOOKASIDE_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

Options = Sequence[tuple[str, Any]]


def make_target(
    service: str, namespace: str, port: str | int, lookaside: str, mode: str, batch: int
) -> Target:
    """Validate the factory arguments shared by the sync and aio channels."""
    if not service:
        raise ValueError("service name must not be empty")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if batch < 1:
        raise ValueError("batch must be >= 1")
    return Target(service, namespace, str(port), lookaside, batch)


def _policy_key(policy: str | RoutingPolicy) -> object:
    return policy if isinstance(policy, str) else ("instance", id(policy))


_registry: dict[object, list[Any]] = {}  # key -> [balancer, refcount]
_registry_lock = threading.Lock()


def balancer_key(
    kind: str, target: Target, mode: str, policy: str | RoutingPolicy, **settings: Any
) -> object:
    """The sharing key of a balancer; unhashable settings make it unique (no sharing)."""
    key = (kind, target, mode, _policy_key(policy), *sorted((k, _hashable(v)) for k, v in settings.items()))
    try:
        hash(key)
    except TypeError:
        return object()
    return key


def _hashable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return ("id", id(value))  # credentials, throttles, loops...: shared only when the same object


def acquire(key: object, factory: Callable[[], Any]) -> Any:
    """The live balancer for ``key`` (made by ``factory`` on first use), with one more reference."""
    with _registry_lock:
        entry = _registry.get(key)
        if entry is None:
            entry = _registry[key] = [factory(), 0]
            entry[0]._key = key
        entry[1] += 1
        return entry[0]


def release(balancer: Any) -> bool:
    """Drop one reference; True when it was the last one (the caller then closes the balancer)."""
    key = getattr(balancer, "_key", None)
    with _registry_lock:
        entry = _registry.get(key)
        if entry is None or entry[0] is not balancer:
            return True
        entry[1] -= 1
        if entry[1] > 0:
            return False
        del _registry[key]
        return True


def _sync_channel(
    address: str, credentials: grpc.ChannelCredentials | None, options: Options
) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, credentials, options=list(options))


def _aio_channel(
    address: str, credentials: grpc.ChannelCredentials | None, options: Options
) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, credentials, options=list(options))


def _close_in_background(channel: grpc.Channel) -> None:
    # A retired channel may be closed from a gRPC callback thread: never block it.
    threading.Thread(target=channel.close, name="lookaside-close", daemon=True).start()


class _BalancerBase:
    """What the sync and aio balancers share: target, policy, the pool's retirement rule, ejection, stats."""

    pool: ChannelPool[Any]
    resolver: Any
    mode: Mode

    def __init__(self, target: Target, policy: str | RoutingPolicy) -> None:
        self.target = target
        self.policy = resolve_policy(policy)
        self.counters = Counters()
        self._key: object = None

    def _resolver_kwargs(
        self, max_staleness: float | None, pick_cache_ttl: float, throttle: bool | AdaptiveThrottle
    ) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_staleness": max_staleness, "counters": self.counters}
        if self.mode != WATCH:
            kw.update(pick_cache_ttl=pick_cache_ttl, throttle=throttle)
        return kw

    def _setup_ejector(self) -> None:
        self.ejector = Ejector(
            self.resolver.population, self.resolver.set_ejected, self.counters, on_eject=self._on_eject
        )
        #: Restored addresses awaiting a success (tested per call: an empty dict is falsy).
        self.probation = self.ejector.probation
        track(self)

    def _on_eject(self, address: str) -> None:
        # A fresh channel (and connection, without inherited reconnect backoff) once the address is back.
        self.pool.retire([address])

    def report_unavailable(self, address: str) -> None:
        """A call to ``address`` failed with UNAVAILABLE before any response: eject it for a cool-down."""
        self.ejector.eject(address)

    def repick(self, failed: str) -> Endpoint | None:
        """Another endpoint than ``failed`` for the one retry, from the known set; None if there is none."""
        cands = tuple(e for e in self.resolver.candidates() if e.address != failed)
        if not cands:
            return None
        ejected = self.ejector.ejected
        healthy = tuple(e for e in cands if e.address not in ejected)
        return self.policy.pick(healthy or cands)

    def stats(self) -> Stats:
        """A snapshot of this balancer's counters."""
        return self.counters.snapshot(self.pool.picks())

    def _stats_items(self) -> Iterable[tuple[str, Stats]]:
        return [(str(self.target), self.stats())]

    def _closed(self) -> None:
        self.ejector.close()
        untrack(self)

    def _on_change(self, current: set[str]) -> None:
        # Addresses not in the new set are retired: their channels close after their in-flight calls.
        gone = self.pool.addresses() - current
        if gone:
            log.info("%s: retiring channels to %s", self.target, sorted(gone))
            self.pool.retire(gone)


class Balancer(_BalancerBase):
    """Sync core for one target; ``pick(timeout)`` returns an endpoint or raises PickError."""

    def __init__(
        self,
        target: Target,
        *,
        mode: Mode = WATCH,
        policy: str | RoutingPolicy = "round_robin",
        credentials: grpc.ChannelCredentials | None = None,
        options: Options = (),
        lookaside_credentials: grpc.ChannelCredentials | None = None,
        init_timeout: float = DEFAULT_INIT_TIMEOUT,
        max_staleness: float | None = DEFAULT_MAX_STALENESS,
        pick_cache_ttl: float = 0.0,
        throttle: bool | AdaptiveThrottle = True,
    ) -> None:
        super().__init__(target, policy)
        self.mode = mode
        opts = tuple(options)
        self.pool: ChannelPool[grpc.Channel] = ChannelPool(
            lambda address: _sync_channel(address, credentials, opts), _close_in_background
        )
        self.lookaside_channel = _sync_channel(
            target.lookaside, lookaside_credentials, LOOKASIDE_CHANNEL_OPTIONS
        )
        stub = protocol.LookasideStub(self.lookaside_channel)
        kw = self._resolver_kwargs(max_staleness, pick_cache_ttl, throttle)
        self.resolver: SyncResolver = (
            WatchResolver(target, stub, self._on_change, init_timeout, **kw)
            if mode == WATCH
            else PerCallResolver(target, stub, init_timeout, **kw)
        )
        self._setup_ejector()

    def pick(self, timeout: float | None = None) -> Endpoint:
        """An endpoint for one call, waiting at most ``timeout`` for a set (or a Resolve)."""
        return self.resolver.pick_nowait(self.policy) or self.resolver.pick(self.policy, timeout)

    def close(self) -> None:
        """Stop the resolver (joining its thread), then close the pooled and the lookaside channels."""
        self._closed()
        self.resolver.close()
        for ch in self.pool.close():
            ch.close()
        self.lookaside_channel.close()


class AioBalancer(_BalancerBase):
    """Aio core for one target; ``await pick(timeout)`` returns an endpoint or raises PickError."""

    def __init__(
        self,
        target: Target,
        *,
        mode: Mode = WATCH,
        policy: str | RoutingPolicy = "round_robin",
        credentials: grpc.ChannelCredentials | None = None,
        options: Options = (),
        lookaside_credentials: grpc.ChannelCredentials | None = None,
        init_timeout: float = DEFAULT_INIT_TIMEOUT,
        max_staleness: float | None = DEFAULT_MAX_STALENESS,
        pick_cache_ttl: float = 0.0,
        throttle: bool | AdaptiveThrottle = True,
    ) -> None:
        super().__init__(target, policy)
        self.mode = mode
        opts = tuple(options)
        self._closing: set[asyncio.Task[None]] = set()
        self.pool: ChannelPool[grpc.aio.Channel] = ChannelPool(
            lambda address: _aio_channel(address, credentials, opts), self._close_later
        )
        self.lookaside_channel = _aio_channel(
            target.lookaside, lookaside_credentials, LOOKASIDE_CHANNEL_OPTIONS
        )
        stub = protocol.LookasideStub(self.lookaside_channel)
        kw = self._resolver_kwargs(max_staleness, pick_cache_ttl, throttle)
        self.resolver: AioResolver = (
            AioWatchResolver(target, stub, self._on_change, init_timeout, **kw)
            if mode == WATCH
            else AioPerCallResolver(target, stub, init_timeout, **kw)
        )
        self._setup_ejector()

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # retired from a foreign thread: let grpc close it when collected
            return
        task = loop.create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def pick(self, timeout: float | None = None) -> Endpoint:
        """An endpoint for one call, waiting at most ``timeout`` for a set (or a Resolve)."""
        return self.resolver.pick_nowait(self.policy) or await self.resolver.pick(self.policy, timeout)

    async def aclose(self, grace: float | None = None) -> None:
        """Stop the resolver task, then close every pooled channel and the lookaside channel."""
        self._closed()
        await self.resolver.aclose()
        channels = self.pool.close()
        await asyncio.gather(*(ch.close(grace) for ch in channels), *self._closing, return_exceptions=True)
        await self.lookaside_channel.close()
