"""The per-target core: resolver + policy + channel pool, shared by channels (and later interceptors)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from lookaside_grpc import protocol
from lookaside_grpc._endpoints import Endpoint
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

log = logging.getLogger(__name__)

#: How long a call without its own timeout waits for the first endpoint set (or a Resolve).
DEFAULT_INIT_TIMEOUT = 10.0

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
    """What the sync and aio balancers share: target, policy and the pool's retirement rule."""

    pool: ChannelPool[Any]

    def __init__(self, target: Target, policy: str | RoutingPolicy) -> None:
        self.target = target
        self.policy = resolve_policy(policy)

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
    ) -> None:
        super().__init__(target, policy)
        self.mode = mode
        opts = tuple(options)
        self.pool: ChannelPool[grpc.Channel] = ChannelPool(
            lambda address: _sync_channel(address, credentials, opts), _close_in_background
        )
        self.lookaside_channel = _sync_channel(target.lookaside, lookaside_credentials, ())
        stub = protocol.LookasideStub(self.lookaside_channel)
        self.resolver: SyncResolver = (
            WatchResolver(target, stub, self._on_change, init_timeout)
            if mode == WATCH
            else PerCallResolver(target, stub, init_timeout)
        )

    def pick(self, timeout: float | None = None) -> Endpoint:
        """An endpoint for one call, waiting at most ``timeout`` for a set (or a Resolve)."""
        return self.resolver.pick_nowait(self.policy) or self.resolver.pick(self.policy, timeout)

    def close(self) -> None:
        """Stop the resolver (joining its thread), then close the pooled and the lookaside channels."""
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
    ) -> None:
        super().__init__(target, policy)
        self.mode = mode
        opts = tuple(options)
        self._closing: set[asyncio.Task[None]] = set()
        self.pool: ChannelPool[grpc.aio.Channel] = ChannelPool(
            lambda address: _aio_channel(address, credentials, opts), self._close_later
        )
        self.lookaside_channel = _aio_channel(target.lookaside, lookaside_credentials, ())
        stub = protocol.LookasideStub(self.lookaside_channel)
        self.resolver: AioResolver = (
            AioWatchResolver(target, stub, self._on_change, init_timeout)
            if mode == WATCH
            else AioPerCallResolver(target, stub, init_timeout)
        )

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def pick(self, timeout: float | None = None) -> Endpoint:
        """An endpoint for one call, waiting at most ``timeout`` for a set (or a Resolve)."""
        return self.resolver.pick_nowait(self.policy) or await self.resolver.pick(self.policy, timeout)

    async def aclose(self, grace: float | None = None) -> None:
        """Stop the resolver task, then close every pooled channel and the lookaside channel."""
        await self.resolver.aclose()
        channels = self.pool.close()
        await asyncio.gather(*(ch.close(grace) for ch in channels), *self._closing, return_exceptions=True)
        await self.lookaside_channel.close()
