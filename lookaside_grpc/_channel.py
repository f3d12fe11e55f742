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
    make_target,
)
from lookaside_grpc._errors import FailedCall, PickError
from lookaside_grpc._health import AdaptiveThrottle, retryable
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._pool import Slot
from lookaside_grpc._resolvers import WATCH, Mode
from lookaside_grpc._retry import UnaryStreamCall, UnaryUnaryFuture, remaining
from lookaside_grpc._stats import Stats

log = logging.getLogger(__name__)

Entry = tuple[Slot[Any], Any]
#: How a future / response-iterator call starts once picked: ``begin(multi, slot, mc, request, timeout,
#: args)`` (``args``: metadata, credentials, wait_for_ready, compression) returns the call object.
Begin = Callable[..., Any]
#: (metadata, credentials, wait_for_ready, compression) of a call
Args = tuple[Any, ...]
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

    def _track(
        self,
        slot: Slot[Any],
        start: Any,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        """Start a non-blocking call (sync future/iterator or grpc.aio call) with ``start`` (a backend
        multicallable, or its ``future``) on ``slot``, already counted; release the slot when it is done (and
        time it, when the policy wants latency feedback), or at once if it cannot start."""
        try:
            call = start(
                request,
                timeout=timeout,
                metadata=metadata,
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )
        except BaseException:
            slot.release()
            raise
        call.add_done_callback(slot.release if self._observe is None else self._done_callback(slot))
        return call

    def _timed(
        self, slot: Slot[Any], start: Any, request: Any, timeout: float | None, args: tuple[Any, ...]
    ) -> Any:
        """A blocking call with ``start`` on ``slot`` (already counted), released and timed on return."""
        observe = self._observe
        t0 = _now() if observe is not None else 0.0
        try:
            return start(request, timeout, *args)
        finally:
            slot.release()
            if observe is not None:
                observe(slot.address, _now() - t0)

    def _succeeded(self, address: str) -> None:
        """A call to ``address`` got its response: a restored address leaves probation."""
        if self._probation:
            self._balancer.ejector.succeeded(address)

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

    def _retry_call(
        self, failed: str, deadline: float | None, request: Any, args: tuple[Any, ...]
    ) -> tuple[Slot[Any], Any] | None:
        """The retry attempt of a non-blocking call (see :meth:`_next_attempt`): its slot and started call
        (:meth:`_track`), or None."""
        nxt = self._next_attempt(failed, deadline)
        if nxt is None:
            return None
        slot, mc = nxt
        return slot, self._track(slot, mc, request, remaining(deadline), *args)

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

    def _nonblocking(self, begin: Begin, request: Any, timeout: float | None, args: tuple[Any, ...]) -> Any:
        """A future / response-iterator call: pick and count it, then ``begin`` it; a pick failure comes
        back as a failed call (raised only when it is used, as grpc does)."""
        try:
            slot, mc, timeout = self._start(timeout)
        except PickError as e:
            return FailedCall(e)
        return begin(self, slot, mc, request, timeout, args)

    def _retry_unary(
        self,
        err: grpc.RpcError,
        failed: str,
        deadline: float | None,
        with_call: bool,
        request: Any,
        args: Args,
    ) -> Any:
        """The one transparent retry of a blocking call that failed with UNAVAILABLE before any response
        byte: eject ``failed``, then call again on another endpoint within the time left; else re-raise."""
        nxt = self._next_attempt(failed, deadline)
        if nxt is None:
            raise err
        slot, mc = nxt
        result = self._timed(slot, mc.with_call if with_call else mc, request, remaining(deadline), args)
        self._succeeded(slot.address)
        return result


def begin_future(
    multi: _MultiCallable, slot: Slot[Any], mc: Any, request: Any, timeout: float | None, args: Args
) -> Any:
    """Begin a stream-unary ``future()``: no retry (the request iterator is consumed)."""
    return multi._track(slot, mc.future, request, timeout, *args)


def begin_call(
    multi: _MultiCallable, slot: Slot[Any], mc: Any, request: Any, timeout: float | None, args: Args
) -> Any:
    """Begin a stream-stream call: no retry (the request iterator is consumed)."""
    return multi._track(slot, mc, request, timeout, *args)


def _unary_blocking(with_call: bool) -> Callable[..., Any]:
    """``__call__`` (or ``with_call``) of unary-unary: blocking, with the retry rule. Made once per method
    at class creation, so a call costs one Python frame here; a try/except and one empty-dict test are all
    it adds when the call succeeds (plus timing it, for policies that want latency feedback)."""

    def call(
        self: _MultiCallable,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        deadline = None if timeout is None else _now() + timeout
        try:
            slot, mc, timeout = self._start(timeout)
        except PickError as e:
            raise FailedCall(e) from None
        observe = self._observe
        t0 = _now() if observe is not None else 0.0
        try:
            if with_call:
                result = mc.with_call(request, timeout, metadata, credentials, wait_for_ready, compression)
            else:
                result = mc(request, timeout, metadata, credentials, wait_for_ready, compression)
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
        args = (metadata, credentials, wait_for_ready, compression)
        return self._retry_unary(err, slot.address, deadline, with_call, request, args)

    call.__name__ = call.__qualname__ = "with_call" if with_call else "__call__"
    return call


def _stream_unary_blocking(with_call: bool) -> Callable[..., Any]:
    """``__call__`` (or ``with_call``) of stream-unary: blocking, never retried (the request iterator is
    consumed)."""

    def call(
        self: _MultiCallable,
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
        args = (metadata, credentials, wait_for_ready, compression)
        return self._timed(slot, mc.with_call if with_call else mc, request_iterator, timeout, args)

    call.__name__ = call.__qualname__ = "with_call" if with_call else "__call__"
    return call


class _UnaryUnary(_MultiCallable, grpc.UnaryUnaryMultiCallable):
    __slots__ = ()

    __call__ = _unary_blocking(with_call=False)
    with_call = _unary_blocking(with_call=True)

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        args = (metadata, credentials, wait_for_ready, compression)
        return self._nonblocking(UnaryUnaryFuture, request, timeout, args)


class _StreamUnary(_MultiCallable, grpc.StreamUnaryMultiCallable):
    __slots__ = ()

    __call__ = _stream_unary_blocking(with_call=False)
    with_call = _stream_unary_blocking(with_call=True)

    def future(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        args = (metadata, credentials, wait_for_ready, compression)
        return self._nonblocking(begin_future, request_iterator, timeout, args)


class _UnaryStream(_MultiCallable, grpc.UnaryStreamMultiCallable):
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
        args = (metadata, credentials, wait_for_ready, compression)
        return self._nonblocking(UnaryStreamCall, request, timeout, args)


class _StreamStream(_MultiCallable, grpc.StreamStreamMultiCallable):
    """stream_stream: the returned call is also the response iterator."""

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
        args = (metadata, credentials, wait_for_ready, compression)
        return self._nonblocking(begin_call, request_iterator, timeout, args)


def _channel_method(kind: str) -> Callable[..., Any]:
    """``Channel.unary_unary`` & co. (sync and aio): the method's multicallable of shape ``kind``."""

    def method(
        self: ChannelCommon,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return self._shapes[kind](
            self._balancer,
            kind,
            method,
            request_serializer,
            response_deserializer,
            bool(_registered_method),
        )

    method.__name__ = method.__qualname__ = kind
    return method


class ChannelCommon:
    """What the sync and aio ``Channel`` share: the balancer, its properties, the four multicallable
    factories (``_shapes`` names each shape's class) and giving the balancer back on close."""

    _shapes: dict[str, type[_MultiCallable]]

    def __init__(self, balancer: Any) -> None:
        self._balancer = balancer
        self._closed = False

    @property
    def target(self) -> str:
        """``service.namespace[:port]``."""
        return str(self._balancer.target)

    @property
    def mode(self) -> Mode:
        """``watch`` or ``per_call``."""
        return self._balancer.mode  # type: ignore[no-any-return]

    @property
    def policy(self) -> RoutingPolicy:
        """The routing policy picking backends."""
        return self._balancer.policy  # type: ignore[no-any-return]

    def stats(self) -> Stats:
        """Counters of this channel's balancer (shared with interceptors/channels on the same settings)."""
        return self._balancer.stats()  # type: ignore[no-any-return]

    unary_unary = _channel_method("unary_unary")
    unary_stream = _channel_method("unary_stream")
    stream_unary = _channel_method("stream_unary")
    stream_stream = _channel_method("stream_stream")

    def _release(self) -> bool:
        """Give the balancer back (once); True when this was its last user (the caller closes it)."""
        if self._closed:
            return False
        self._closed = True
        return _balancer.release(self._balancer)


class Channel(ChannelCommon, grpc.Channel):
    """A ``grpc.Channel`` balancing every call over the pods of one Kubernetes Service.

    Build it with :func:`lookaside_grpc.channel`. Each call picks a backend (via the lookaside) and goes over
    that backend's long-lived pooled channel, so HTTP/2 connections are reused, never re-dialled per call.
    """

    _shapes = {
        "unary_unary": _UnaryUnary,
        "unary_stream": _UnaryStream,
        "stream_unary": _StreamUnary,
        "stream_stream": _StreamStream,
    }

    def __init__(self, balancer: Balancer) -> None:
        super().__init__(balancer)

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        """Connectivity of the lookaside channel (the per-backend channels come and go)."""
        self._balancer.lookaside_channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._balancer.lookaside_channel.unsubscribe(callback)

    def close(self) -> None:
        """Release the balancer; the last user stops the watch thread (joined) and closes every pooled
        channel and the lookaside channel."""
        if self._release():
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
    settings = _balancer.settings(
        credentials=credentials,
        options=options,
        lookaside_credentials=lookaside_credentials,
        init_timeout=init_timeout,
        max_staleness=max_staleness,
        pick_cache_ttl=pick_cache_ttl,
        throttle=throttle,
        tls_server_name=tls_server_name,
    )
    return Channel(_balancer.shared("sync", Balancer, target, mode, policy, settings))
