"""``Channel``: a ``grpc.Channel`` that sends each call over a pooled channel to a picked backend.

Any generated stub works unchanged on it. The hot path per call: one pick (list index in watch mode), one
dict lookup for the cached per-backend multicallable, in-flight accounting, then the real gRPC call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from lookaside_grpc import _balancer
from lookaside_grpc._balancer import (
    DEFAULT_INIT_TIMEOUT,
    DEFAULT_MAX_STALENESS,
    Balancer,
    Options,
    balancer_key,
    make_target,
)
from lookaside_grpc._errors import FailedCall, PickError
from lookaside_grpc._health import AdaptiveThrottle, retryable
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._pool import Slot
from lookaside_grpc._resolvers import WATCH, Mode
from lookaside_grpc._retry import UnaryStreamCall, UnaryUnaryFuture
from lookaside_grpc._stats import Stats

log = logging.getLogger(__name__)

Entry = tuple[Slot[Any], Any]
_now = time.monotonic


class _MultiCallable:
    """Shared by the four call shapes: pick, find the cached backend multicallable, count the call."""

    __slots__ = (
        "_balancer",
        "_resolver",
        "_policy",
        "_kind",
        "_method",
        "_ser",
        "_deser",
        "_registered",
        "_cache",
        "_probation",
        "_observe",
    )

    def __init__(
        self,
        balancer: Any,
        kind: str,
        method: str,
        request_serializer: Callable[[Any], bytes] | None,
        response_deserializer: Callable[[bytes], Any] | None,
        registered: bool,
    ) -> None:
        self._balancer = balancer
        self._resolver = balancer.resolver
        self._policy = balancer.policy
        self._kind = kind
        self._method = method
        self._ser = request_serializer
        self._deser = response_deserializer
        self._registered = registered
        #: address -> (pool slot, that backend channel's multicallable for this method)
        self._cache: dict[str, Entry] = {}
        #: restored addresses awaiting a success: an empty dict, tested once per call
        self._probation = balancer.probation
        #: the policy's latency feedback, or None when it needs none (then calls are not timed)
        self._observe: Callable[[str, float], None] | None = balancer.observe

    def _bind(self, address: str) -> Entry:
        slot = self._balancer.pool.get(address)
        factory = getattr(slot.channel, self._kind)
        entry = self._cache[address] = (
            slot,
            factory(self._method, self._ser, self._deser, _registered_method=self._registered),
        )
        return entry

    def _entry(self, address: str) -> Entry:
        """The cached (slot, multicallable) for ``address``, with the call about to start counted on it."""
        entry = self._cache.get(address)
        if entry is None or entry[0].retired:
            entry = self._bind(address)
        while not entry[0].acquire():  # closed under us: the pool has (or makes) a fresh one
            entry = self._bind(address)
        return entry

    def _done_callback(self, slot: Slot[Any]) -> Callable[[Any], None]:
        """The done callback of a call started on ``slot``: release it (and time the call, when the policy
        wants latency feedback)."""
        observe = self._observe
        if observe is None:
            return slot.release
        t0 = _now()
        address = slot.address

        def done(_call: object = None) -> None:
            slot.release()
            observe(address, _now() - t0)

        return done

    def _next_attempt(self, failed: str, deadline: float | None) -> Entry | None:
        """The retry rule's second attempt: eject ``failed``, pick another endpoint and count the call on
        it; None if there is none or no time is left (monotonic ``deadline``)."""
        balancer = self._balancer
        balancer.report_unavailable(failed)
        ep = balancer.repick(failed)
        if ep is None or (deadline is not None and deadline - _now() <= 0):
            return None
        balancer.counters.retry()
        log.info(
            "%s: retrying %s on %s after UNAVAILABLE from %s",
            balancer.target,
            self._method,
            ep.address,
            failed,
        )
        return self._entry(ep.address)

    def _start(self, timeout: float | None) -> tuple[Slot[Any], Any, float | None]:
        """Pick a backend (sync) and count the call on it; raises PickError."""
        ep = self._resolver.pick_nowait(self._policy)
        if ep is None:
            if timeout is None:
                ep = self._resolver.pick(self._policy, None)
            else:
                start = time.monotonic()
                ep = self._resolver.pick(self._policy, timeout)
                timeout = max(0.0, timeout - (time.monotonic() - start))
        slot, mc = self._entry(ep.address)
        return slot, mc, timeout

    def _retry_unary(
        self,
        err: grpc.RpcError,
        failed: str,
        deadline: float | None,
        with_call: bool,
        request: Any,
        args: tuple[Any, ...],
    ) -> Any:
        """The one transparent retry of a call that failed with UNAVAILABLE before any response byte:
        eject ``failed``, then call again on another endpoint within the remaining time; else re-raise."""
        nxt = self._next_attempt(failed, deadline)
        if nxt is None:
            raise err
        slot, mc = nxt
        timeout = None if deadline is None else max(0.0, deadline - _now())
        observe = self._observe
        t0 = _now() if observe is not None else 0.0
        try:
            result = mc.with_call(request, timeout, *args) if with_call else mc(request, timeout, *args)
        finally:
            slot.release()
            if observe is not None:
                observe(slot.address, _now() - t0)
        if self._probation:
            self._balancer.ejector.succeeded(slot.address)
        return result

    def _invoke_unary(
        self, with_call: bool, request: Any, timeout: float | None, args: tuple[Any, ...]
    ) -> Any:
        """Blocking unary-response call (``__call__``/``with_call``) with the retry rule; a try/except and
        one empty-dict test are all it adds when the call succeeds (plus timing it, for policies that want
        latency feedback)."""
        deadline = None if timeout is None else _now() + timeout
        try:
            slot, mc, timeout = self._start(timeout)
        except PickError as e:
            raise FailedCall(e) from None
        observe = self._observe
        t0 = _now() if observe is not None else 0.0
        try:
            result = mc.with_call(request, timeout, *args) if with_call else mc(request, timeout, *args)
        except grpc.RpcError as e:
            if not retryable(e):
                if observe is not None:
                    observe(slot.address, _now() - t0)
                raise
            err = e
        else:
            if observe is not None:
                observe(slot.address, _now() - t0)
            if self._probation:
                self._balancer.ejector.succeeded(slot.address)
            return result
        finally:
            slot.release()
        return self._retry_unary(err, slot.address, deadline, with_call, request, args)


class _UnaryUnary(_MultiCallable, grpc.UnaryUnaryMultiCallable):
    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke_unary(
            False, request, timeout, (metadata, credentials, wait_for_ready, compression)
        )

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        return self._invoke_unary(  # type: ignore[no-any-return]
            True, request, timeout, (metadata, credentials, wait_for_ready, compression)
        )

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        try:
            slot, mc, timeout = self._start(timeout)
        except PickError as e:
            return FailedCall(e)
        args = (metadata, credentials, wait_for_ready, compression)
        return UnaryUnaryFuture(self, slot, mc, request, timeout, args)


class _StreamUnary(_MultiCallable, grpc.StreamUnaryMultiCallable):
    __slots__ = ()

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        try:
            slot, mc, timeout = self._start(timeout)
        except PickError as e:
            raise FailedCall(e) from None
        observe = self._observe
        t0 = _now() if observe is not None else 0.0
        try:
            return mc(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        finally:
            slot.release()
            if observe is not None:
                observe(slot.address, _now() - t0)

    def with_call(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        try:
            slot, mc, timeout = self._start(timeout)
        except PickError as e:
            raise FailedCall(e) from None
        observe = self._observe
        t0 = _now() if observe is not None else 0.0
        try:
            return mc.with_call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)  # type: ignore[no-any-return]
        finally:
            slot.release()
            if observe is not None:
                observe(slot.address, _now() - t0)

    def future(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        try:
            slot, mc, timeout = self._start(timeout)
        except PickError as e:
            return FailedCall(e)
        try:
            fut = mc.future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        except BaseException:
            slot.release()
            raise
        fut.add_done_callback(self._done_callback(slot))
        return fut


class _StreamingResponse(_MultiCallable):
    """unary_stream and stream_stream: the returned call is also the response iterator."""

    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        try:
            slot, mc, timeout = self._start(timeout)
        except PickError as e:
            return FailedCall(e)
        try:
            call = mc(request, timeout, metadata, credentials, wait_for_ready, compression)
        except BaseException:
            slot.release()
            raise
        call.add_done_callback(self._done_callback(slot))
        return call


class _UnaryStream(_StreamingResponse, grpc.UnaryStreamMultiCallable):
    """unary_stream with the one retry before the first response message (see ``_retry``)."""

    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        try:
            slot, mc, timeout = self._start(timeout)
        except PickError as e:
            return FailedCall(e)
        args = (metadata, credentials, wait_for_ready, compression)
        return UnaryStreamCall(self, slot, mc, request, timeout, args)


class _StreamStream(_StreamingResponse, grpc.StreamStreamMultiCallable):
    __slots__ = ()


class Channel(grpc.Channel):
    """A ``grpc.Channel`` balancing every call over the pods of one Kubernetes Service.

    Build it with :func:`lookaside_grpc.channel`. Each call picks a backend (via the lookaside) and goes over
    that backend's long-lived pooled channel, so HTTP/2 connections are reused, never re-dialled per call.
    """

    def __init__(self, balancer: Balancer) -> None:
        self._balancer = balancer
        self._closed = False

    @property
    def target(self) -> str:
        """``service.namespace[:port]``."""
        return str(self._balancer.target)

    @property
    def mode(self) -> Mode:
        """``watch`` or ``per_call``."""
        return self._balancer.mode

    @property
    def policy(self) -> RoutingPolicy:
        """The routing policy picking backends."""
        return self._balancer.policy

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable:
        return _UnaryUnary(
            self._balancer,
            "unary_unary",
            method,
            request_serializer,
            response_deserializer,
            bool(_registered_method),
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable:
        return _UnaryStream(
            self._balancer,
            "unary_stream",
            method,
            request_serializer,
            response_deserializer,
            bool(_registered_method),
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable:
        return _StreamUnary(
            self._balancer,
            "stream_unary",
            method,
            request_serializer,
            response_deserializer,
            bool(_registered_method),
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable:
        return _StreamStream(
            self._balancer,
            "stream_stream",
            method,
            request_serializer,
            response_deserializer,
            bool(_registered_method),
        )

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        """Connectivity of the lookaside channel (the per-backend channels come and go)."""
        self._balancer.lookaside_channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._balancer.lookaside_channel.unsubscribe(callback)

    def stats(self) -> Stats:
        """Counters of this channel's balancer (shared with interceptors/channels on the same settings)."""
        return self._balancer.stats()

    def close(self) -> None:
        """Release the balancer; the last user stops the watch thread (joined) and closes every pooled
        channel and the lookaside channel."""
        if self._closed:
            return
        self._closed = True
        if _balancer.release(self._balancer):
            self._balancer.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def channel(
    service: str,
    *,
    namespace: str = "default",
    lookaside: str = "127.0.0.1:50055",
    mode: Mode = WATCH,
    policy: str | RoutingPolicy = "round_robin",
    port: str | int = "",
    credentials: grpc.ChannelCredentials | None = None,
    options: Options = (),
    lookaside_credentials: grpc.ChannelCredentials | None = None,
    batch: int = 1,
    init_timeout: float = DEFAULT_INIT_TIMEOUT,
    max_staleness: float | None = DEFAULT_MAX_STALENESS,
    pick_cache_ttl: float = 0.0,
    throttle: bool | AdaptiveThrottle = True,
    tls_server_name: str | None = None,
) -> Channel:
    """A channel balancing calls over the pods of Service ``service`` in ``namespace``, via ``lookaside``.

    ``mode="watch"`` (the default) keeps the endpoint set locally from one background Watch stream and picks
    per call with ``policy``, at no extra round trip; ``mode="per_call"`` asks the lookaside (``Resolve``)
    before every call as the original design did, which roughly halves throughput (measured 0.41-0.59x), so
    it is not the default; ``batch`` > 1 amortises it by asking for that many picks per Resolve.
    ``credentials``/``options`` apply to the per-backend channels (one per pod, reused by every call);
    ``lookaside_credentials`` to the lookaside channel (None = insecure). ``port`` names the Service port.
    Backends are dialled by pod IP: with ``credentials``, TLS verifies (and ``:authority`` names)
    ``tls_server_name``, by default the Service DNS name ``<service>.<namespace>.svc`` (your own
    ``grpc.ssl_target_name_override`` / ``grpc.default_authority`` options win; ``""`` = the pod IP).
    A call made before the first endpoint set waits for it up to its own timeout (else ``init_timeout``) and
    then fails with UNAVAILABLE.

    ``policy``: ``"round_robin"`` (default), ``"random"``, ``"least_request"`` (power of two choices over
    this client's calls in flight), ``"peak_ewma"`` (power of two choices over latency EWMA x (in flight +
    1)), ``"weighted"`` (rotation over the weights the lookaside derives from the load every client reports;
    the channel reports its own every second), or a :class:`RoutingPolicy`. In ``per_call`` mode the
    lookaside picks with the matching router over the load reported by all clients.

    Resilience: when the lookaside is unreachable the last set (watch) or the last picks (per_call, rotated
    locally) keep serving for ``max_staleness`` seconds (default 300; None = forever), after which calls fail
    with UNAVAILABLE until the lookaside answers again. A unary-unary call (blocking or ``future()``) or a
    unary-stream call that fails with UNAVAILABLE before any response message is retried once on another
    endpoint within its deadline, and the failing address is ejected from picks for a cool-down (1 s
    doubling to 30 s; at most half the set).
    ``per_call`` only: ``pick_cache_ttl`` > 0 reuses one Resolve's picks for that many seconds; ``throttle``
    (default on) rejects Resolves locally while the lookaside keeps failing (adaptive throttling, as RLS).
    Channels with identical settings share one balancer (Watch stream, pool, counters).
    """
    target = make_target(service, namespace, port, lookaside, mode, batch)
    settings: dict[str, Any] = dict(
        credentials=credentials,
        options=tuple(options),
        lookaside_credentials=lookaside_credentials,
        init_timeout=init_timeout,
        max_staleness=max_staleness,
        pick_cache_ttl=pick_cache_ttl,
        throttle=throttle,
    )
    if tls_server_name is not None:  # only when given: keeps the key shared with interceptors' balancers
        settings["tls_server_name"] = tls_server_name
    key = balancer_key("sync", target, mode, policy, **settings)
    return Channel(_balancer.acquire(key, lambda: Balancer(target, mode=mode, policy=policy, **settings)))
