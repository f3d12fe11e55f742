"""What every call shape and flavour shares: picking an endpoint, binding an address to the pooled backend
channel's multicallable (cached per method, forgotten once the pool retires the address), counting the call
in flight, the one completion hook (:meth:`Method.ended`: per-endpoint metrics, latency feedback, and the
call's status and trailing metadata for a policy that asks for them), and choosing the endpoint of the one
retry (ejecting the failed one)."""

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
from lookaside_grpc._ring_hash import Metadata as CallMetadata
from lookaside_grpc._stats import EndpointMetrics

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
OK = grpc.StatusCode.OK
#: A policy's per-call completion hook: (address, seconds, status code, trailing metadata or None).
CallDone = Callable[[str, float, grpc.StatusCode, Metadata | None], None]


def trailer_hook(policy: object) -> CallDone | None:
    """The policy's ``call_done`` when it asks for every call's status and trailing metadata
    (``wants_trailers``, as ``weighted_round_robin`` does), found through the slow-start and zone wrappers
    (their ``inner``); None otherwise: then no call fetches its trailing metadata."""
    for _ in range(8):
        if policy is None:
            return None
        if getattr(policy, "wants_trailers", False):
            hook: CallDone = policy.call_done  # type: ignore[attr-defined]
            return hook
        policy = getattr(policy, "inner", None)
    return None


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
    """A pooled backend channel (its slot), that channel's multicallable for one method, and the address's
    call metrics."""

    __slots__ = ("slot", "call", "metrics")

    def __init__(self, slot: Slot[C], call: M, metrics: EndpointMetrics) -> None:
        self.slot: Slot[C] = slot
        self.call: M = call
        self.metrics = metrics


class Method(Generic[C, M]):
    """One gRPC method of one call shape on one balancer: the engine's per-call steps."""

    __slots__ = ("balancer", "name", "_make", "_cache", "_gen", "_pool", "observe", "call_done", "_table")

    def __init__(self, balancer: BalancerBase[C], name: str, make: Callable[[C], M]) -> None:
        self.balancer: BalancerBase[C] = balancer
        self.name = name
        self._make: Callable[[C], M] = make
        #: address -> bound multicallable; pruned of retired slots when the pool's generation moves
        self._cache: dict[str, Bound[C, M]] = {}
        self._pool: ChannelPool[C] = balancer.pool
        self._gen = balancer.pool.generation
        #: the policy's latency feedback, or None when it needs none
        self.observe = balancer.observe
        #: the policy's completion hook, or None: only then do calls fetch their trailing metadata
        self.call_done = trailer_hook(balancer.policy)
        self._table = balancer.counters.endpoints

    def _bind(self, address: str) -> Bound[C, M]:
        slot = self.balancer.pool.get(address)
        bound = self._cache[address] = Bound(slot, self._make(slot.channel), self._table.get(address))
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
        """Start time of a call (every call is timed: the per-endpoint latency histogram)."""
        return _now()

    def ended(
        self, bound: Bound[C, M], t0: float, code: grpc.StatusCode, trailing: Metadata | None = None
    ) -> None:
        """The completion hook: the call on ``bound`` started at ``t0`` ended with ``code`` (and
        ``trailing`` metadata, fetched only when :attr:`call_done` is set). Uncounts it, counts it per
        endpoint and feeds the policy."""
        bound.slot.release()
        seconds = _now() - t0
        bound.metrics.ended(seconds, code)
        observe = self.observe
        if observe is not None:
            observe(bound.slot.address, seconds)
        call_done = self.call_done
        if call_done is not None:
            try:
                call_done(bound.slot.address, seconds, code, trailing)
            except Exception:  # a policy's hook must never fail the call it hears about
                log.exception("%s: the policy's call_done failed", self.balancer.target)

    def succeeded(self, address: str) -> None:
        """A call to ``address`` got a response: a restored address leaves probation."""
        if self.balancer.probation:
            self.balancer.succeeded(address)

    def retry_bound(
        self, failed: str, deadline: float | None, metadata: CallMetadata | None = None
    ) -> Bound[C, M] | None:
        """The retry rule's second attempt: eject ``failed``, pick another endpoint (``ring_hash``: the
        next ring entry for the call's key in ``metadata``) and count the call on it; None if there is none
        or no time is left."""
        balancer = self.balancer
        balancer.report_unavailable(failed)
        ep = balancer.repick(failed, metadata)
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
    balancer: Balancer,
    wait: float | None,
    wait_for_ready: bool,
    on_timeout: grpc.StatusCode,
    metadata: CallMetadata | None = None,
) -> Endpoint:
    """An endpoint for a call (raises PickError): the hot path is one local pick (the call's metadata is
    read only by a policy hashing a key of it)."""
    ep = balancer.resolver.pick_nowait(balancer.policy, metadata)
    if ep is not None:
        return ep
    return balancer.resolver.pick(balancer.policy, wait, wait_for_ready, on_timeout, metadata)


async def pick_aio(
    balancer: AioBalancer,
    wait: float | None,
    wait_for_ready: bool,
    on_timeout: grpc.StatusCode,
    metadata: CallMetadata | None = None,
) -> Endpoint:
    """The aio twin of :func:`pick_sync`."""
    ep = balancer.resolver.pick_nowait(balancer.policy, metadata)
    if ep is not None:
        return ep
    return await balancer.resolver.pick(balancer.policy, wait, wait_for_ready, on_timeout, metadata)


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
