"""What every call shape and flavour shares: picking an endpoint, binding an address to the pooled backend
channel's multicallable (cached per method, forgotten once the pool retires the address), counting the call
in flight, latency feedback, and choosing the endpoint of the one retry (ejecting the failed one)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

import grpc
import grpc.aio

from lookaside_grpc._balancer import AioBalancer, Balancer, BalancerBase
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._pool import ChannelPool, Slot

log = logging.getLogger(__name__)

C = TypeVar("C", grpc.Channel, grpc.aio.Channel)
M = TypeVar("M", covariant=True)
Req = TypeVar("Req")
Resp = TypeVar("Resp")

#: Call metadata as both grpc flavours take it.
Metadata = tuple[tuple[str, str | bytes], ...]
Serializer = Callable[[Req], bytes]
Deserializer = Callable[[bytes], Resp]
_now = time.monotonic


class CallArgs(NamedTuple):
    """The per-call options passed through to the backend call (and to its retry); a tuple, as it is made
    on every call."""

    metadata: Metadata | None = None
    credentials: grpc.CallCredentials | None = None
    wait_for_ready: bool | None = None
    compression: grpc.Compression | None = None


#: The options of a call that sets none (most calls): shared, not made per call.
NO_ARGS = CallArgs()


def remaining(deadline: float | None) -> float | None:
    """Seconds left until the monotonic ``deadline`` (None = no deadline), never negative."""
    return None if deadline is None else max(0.0, deadline - _now())


def deadline_of(timeout: float | None) -> float | None:
    return None if timeout is None else _now() + timeout


class Bound(Generic[C, M]):
    """A pooled backend channel (its slot) and that channel's multicallable for one method."""

    __slots__ = ("slot", "call")

    def __init__(self, slot: Slot[C], call: M) -> None:
        self.slot: Slot[C] = slot
        self.call: M = call


class Method(Generic[C, M]):
    """One gRPC method of one call shape on one balancer: the engine's per-call steps."""

    __slots__ = ("balancer", "name", "_make", "_cache", "_gen", "_pool", "observe")

    def __init__(self, balancer: BalancerBase[C], name: str, make: Callable[[C], M]) -> None:
        self.balancer: BalancerBase[C] = balancer
        self.name = name
        self._make: Callable[[C], M] = make
        #: address -> bound multicallable; pruned of retired slots when the pool's generation moves
        self._cache: dict[str, Bound[C, M]] = {}
        self._pool: ChannelPool[C] = balancer.pool
        self._gen = balancer.pool.generation
        #: the policy's latency feedback, or None when it needs none (then calls are not timed)
        self.observe = balancer.observe

    def _bind(self, address: str) -> Bound[C, M]:
        slot = self.balancer.pool.get(address)
        bound = self._cache[address] = Bound(slot, self._make(slot.channel))
        return bound

    def _prune(self) -> None:
        self._gen = self._pool.generation
        for address, bound in list(self._cache.items()):
            if bound.slot.retired:
                self._cache.pop(address, None)

    def cached(self) -> int:
        """Addresses bound in this method's cache (for tests)."""
        return len(self._cache)

    def enter(self, address: str) -> Bound[C, M]:
        """The bound multicallable for ``address``, with the call about to start counted on its slot."""
        if self._pool.generation != self._gen:
            self._prune()
        bound = self._cache.get(address)
        if bound is None or bound.slot.retired:
            bound = self._bind(address)
        while not bound.slot.acquire():  # closed under us: the pool has (or makes) a fresh one
            bound = self._bind(address)
        return bound

    def clock(self) -> float:
        """Start time of a call, when the policy wants latency feedback (else 0, untimed)."""
        return _now() if self.observe is not None else 0.0

    def finished(self, slot: Slot[C], t0: float) -> None:
        """A call on ``slot`` finished: uncount it (and feed its latency to the policy)."""
        slot.release()
        observe = self.observe
        if observe is not None:
            observe(slot.address, _now() - t0)

    def succeeded(self, address: str) -> None:
        """A call to ``address`` got a response: a restored address leaves probation."""
        if self.balancer.probation:
            self.balancer.succeeded(address)

    def retry_bound(self, failed: str, deadline: float | None) -> Bound[C, M] | None:
        """The retry rule's second attempt: eject ``failed``, pick another endpoint and count the call on
        it; None if there is none or no time is left."""
        balancer = self.balancer
        balancer.report_unavailable(failed)
        ep = balancer.repick(failed)
        if ep is None or (deadline is not None and deadline - _now() <= 0):
            return None
        budget = balancer.budget
        if budget is not None and not budget.withdraw():
            balancer.counters.over_budget()
            return None
        balancer.counters.retry()
        log.info(
            "%s: retrying %s on %s after UNAVAILABLE from %s", balancer.target, self.name, ep.address, failed
        )
        return self.enter(ep.address)


def pick_sync(
    balancer: Balancer, wait: float | None, wait_for_ready: bool, on_timeout: grpc.StatusCode
) -> Endpoint:
    """An endpoint for a call (raises PickError): the hot path is one local pick."""
    ep = balancer.resolver.pick_nowait(balancer.policy)
    if ep is not None:
        return ep
    return balancer.resolver.pick(balancer.policy, wait, wait_for_ready, on_timeout)


async def pick_aio(
    balancer: AioBalancer, wait: float | None, wait_for_ready: bool, on_timeout: grpc.StatusCode
) -> Endpoint:
    """The aio twin of :func:`pick_sync`."""
    ep = balancer.resolver.pick_nowait(balancer.policy)
    if ep is not None:
        return ep
    return await balancer.resolver.pick(balancer.policy, wait, wait_for_ready, on_timeout)


# Backend multicallable types, by flavour and shape.
SyncUU = grpc.UnaryUnaryMultiCallable
SyncUS = grpc.UnaryStreamMultiCallable
SyncSU = grpc.StreamUnaryMultiCallable
SyncSS = grpc.StreamStreamMultiCallable


class SyncMethods:
    """Make the engine's :class:`Method` of each shape on a sync balancer."""

    @staticmethod
    def unary_unary(
        b: Balancer, name: str, ser: Serializer[Req] | None, deser: Deserializer[Resp] | None, reg: bool
    ) -> Method[grpc.Channel, grpc.UnaryUnaryMultiCallable[Req, Resp]]:
        return Method(b, name, lambda ch: with_registered(ch.unary_unary, reg)(name, ser, deser))

    @staticmethod
    def unary_stream(
        b: Balancer, name: str, ser: Serializer[Req] | None, deser: Deserializer[Resp] | None, reg: bool
    ) -> Method[grpc.Channel, grpc.UnaryStreamMultiCallable[Req, Resp]]:
        return Method(b, name, lambda ch: with_registered(ch.unary_stream, reg)(name, ser, deser))

    @staticmethod
    def stream_unary(
        b: Balancer, name: str, ser: Serializer[Req] | None, deser: Deserializer[Resp] | None, reg: bool
    ) -> Method[grpc.Channel, grpc.StreamUnaryMultiCallable[Req, Resp]]:
        return Method(b, name, lambda ch: with_registered(ch.stream_unary, reg)(name, ser, deser))

    @staticmethod
    def stream_stream(
        b: Balancer, name: str, ser: Serializer[Req] | None, deser: Deserializer[Resp] | None, reg: bool
    ) -> Method[grpc.Channel, grpc.StreamStreamMultiCallable[Req, Resp]]:
        return Method(b, name, lambda ch: with_registered(ch.stream_stream, reg)(name, ser, deser))


class AioMethods:
    """Make the engine's :class:`Method` of each shape on an aio balancer."""

    @staticmethod
    def unary_unary(
        b: AioBalancer, name: str, ser: Serializer[Req] | None, deser: Deserializer[Resp] | None, reg: bool
    ) -> Method[grpc.aio.Channel, grpc.aio.UnaryUnaryMultiCallable[Req, Resp]]:
        return Method(b, name, lambda ch: with_registered(ch.unary_unary, reg)(name, ser, deser))

    @staticmethod
    def unary_stream(
        b: AioBalancer, name: str, ser: Serializer[Req] | None, deser: Deserializer[Resp] | None, reg: bool
    ) -> Method[grpc.aio.Channel, grpc.aio.UnaryStreamMultiCallable[Req, Resp]]:
        return Method(b, name, lambda ch: with_registered(ch.unary_stream, reg)(name, ser, deser))

    @staticmethod
    def stream_unary(
        b: AioBalancer, name: str, ser: Serializer[Req] | None, deser: Deserializer[Resp] | None, reg: bool
    ) -> Method[grpc.aio.Channel, grpc.aio.StreamUnaryMultiCallable[Req, Resp]]:
        return Method(b, name, lambda ch: with_registered(ch.stream_unary, reg)(name, ser, deser))

    @staticmethod
    def stream_stream(
        b: AioBalancer, name: str, ser: Serializer[Req] | None, deser: Deserializer[Resp] | None, reg: bool
    ) -> Method[grpc.aio.Channel, grpc.aio.StreamStreamMultiCallable[Req, Resp]]:
        return Method(b, name, lambda ch: with_registered(ch.stream_stream, reg)(name, ser, deser))


F = TypeVar("F", bound=Callable[..., object])


def with_registered(make: F, registered: bool) -> F:
    """``channel.<shape>`` passing grpc's private ``_registered_method`` flag along when the stub set it
    (registered methods skip a per-call lookup in grpc core); instrumented channels may not take it."""
    if not registered:
        return make

    def with_flag(*args: object) -> object:
        try:
            return make(*args, _registered_method=True)
        except TypeError:
            return make(*args)

    return with_flag  # type: ignore[return-value]
