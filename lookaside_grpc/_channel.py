"""``Channel``: a ``grpc.Channel`` that sends each call over a pooled channel to a picked backend.

Any generated stub works unchanged on it. The hot path per call: one local pick, one dict lookup for the
cached per-backend multicallable, in-flight accounting, then the real gRPC call (``_calls``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, Unpack, cast, overload

import grpc

from lookaside_grpc import _balancer, _compat
from lookaside_grpc._balancer import Balancer, Lease
from lookaside_grpc._calls import _sync
from lookaside_grpc._calls._engine import (
    CallArgs,
    Deserializer,
    Metadata,
    Method,
    Serializer,
    SyncMethods,
    deadline_of,
    pick_sync,
    remaining,
)
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._errors import FailedCall, PickError
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._resolvers import PerCallResolver
from lookaside_grpc._settings import ClientOptions, Mode, Settings, make_settings, make_target
from lookaside_grpc._stats import Stats
from lookaside_grpc._target import Target
from lookaside_grpc._xds_mode import Xds, XdsChannel, XdsModeName, XdsOptions, is_xds, xds_settings

Req = TypeVar("Req")
Resp = TypeVar("Resp")
M = TypeVar("M")
T = TypeVar("T")

#: How long a call without its own deadline waits for the lookaside on a cold start.
DEFAULT_INIT_TIMEOUT = 10.0
CLOSED = "Cannot invoke RPC on closed channel!"
_now = time.monotonic


def pick_wait(
    timeout: float | None, wait_for_ready: bool | None, init_timeout: float
) -> tuple[float | None, grpc.StatusCode]:
    """How long a factory call may wait for its pick, and the status it fails with when that runs out: its
    own deadline (DEADLINE_EXCEEDED), forever with ``wait_for_ready`` and no deadline, else ``init_timeout``
    (UNAVAILABLE)."""
    if timeout is not None:
        return timeout, grpc.StatusCode.DEADLINE_EXCEEDED
    if wait_for_ready:
        return None, grpc.StatusCode.DEADLINE_EXCEEDED
    return init_timeout, grpc.StatusCode.UNAVAILABLE


class _Multi(Generic[M]):
    """What the four sync multicallables share: the channel (kept alive by its stubs) and the method."""

    __slots__ = ("_channel", "_m")

    def __init__(self, channel: Channel, m: Method[grpc.Channel, M]) -> None:
        self._channel = channel
        self._m = m

    def _later(
        self,
        metadata: Metadata | None,
        timeout: float | None,
        wait_for_ready: bool | None,
        start: Callable[[Endpoint], T],
    ) -> T:
        """A non-blocking call: started at once on a local pick, else returned at once as a call that
        starts once its pick arrives (grpc never blocks in ``future()`` or a response stream's call)."""
        ch = self._channel
        if ch._closed:
            raise ValueError(CLOSED)
        balancer = ch._balancer
        resolver = balancer.resolver
        try:
            ep = resolver.pick_nowait(balancer.policy, metadata) or resolver.ready(
                balancer.policy, bool(wait_for_ready), metadata
            )
            if ep is None and isinstance(resolver, PerCallResolver) and not wait_for_ready:
                if resolver.connectivity() is grpc.ChannelConnectivity.READY:  # a Resolve takes one RTT
                    ep = self._pick(timeout, wait_for_ready, metadata)
        except PickError as e:  # failing fast, as grpc in TRANSIENT_FAILURE: a failed call, at once
            return cast(T, FailedCall(e))
        if ep is not None:
            return start(ep)
        wait, code = pick_wait(timeout, wait_for_ready, ch._init_timeout)
        deferred = _sync.DeferredCall(
            lambda: start(pick_sync(balancer, wait, bool(wait_for_ready), code, metadata))
        )
        return cast(T, deferred)  # it delegates every call method to the call ``start`` makes

    def _pick(
        self, timeout: float | None, wait_for_ready: bool | None, metadata: Metadata | None = None
    ) -> Endpoint:
        ch = self._channel
        if ch._closed:
            raise ValueError(CLOSED)
        balancer = ch._balancer
        ep = balancer.resolver.pick_nowait(balancer.policy, metadata)
        if ep is not None:
            return ep
        wait, code = pick_wait(timeout, wait_for_ready, ch._init_timeout)
        return pick_sync(balancer, wait, bool(wait_for_ready), code, metadata)


class _UnaryUnary(
    _Multi[_compat.UnaryUnaryMultiCallable[Req, Resp]], _compat.UnaryUnaryMultiCallable[Req, Resp]
):
    __slots__ = ()

    def __call__(
        self,
        request: Req,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Resp:
        ch = self._channel
        if ch._closed:
            raise ValueError(CLOSED)
        balancer = ch._balancer
        deadline = None if timeout is None else _now() + timeout
        ep = balancer.resolver.pick_nowait(balancer.policy, metadata)
        if ep is None:
            try:
                ep = self._pick(timeout, wait_for_ready, metadata)
            except PickError as e:
                raise FailedCall(e) from None
            timeout = remaining(deadline)
        args = CallArgs(metadata, credentials, wait_for_ready, compression)
        return _sync.unary_unary(self._m, ep, request, timeout, deadline, args)

    def with_call(
        self,
        request: Req,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Resp, grpc.Call]:
        deadline = deadline_of(timeout)
        try:
            ep = self._pick(timeout, wait_for_ready, metadata)
        except PickError as e:
            raise FailedCall(e) from None
        args = CallArgs(metadata, credentials, wait_for_ready, compression)
        return _sync.unary_unary_with_call(self._m, ep, request, deadline, args)

    def future(
        self,
        request: Req,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _compat.CallFuture[Resp]:
        deadline = deadline_of(timeout)
        args = CallArgs(metadata, credentials, wait_for_ready, compression)
        m = self._m
        return self._later(
            metadata,
            timeout,
            wait_for_ready,
            lambda ep: _sync.UnaryUnaryFuture(m, ep, request, deadline, args),
        )


class _UnaryStream(
    _Multi[_compat.UnaryStreamMultiCallable[Req, Resp]], _compat.UnaryStreamMultiCallable[Req, Resp]
):
    __slots__ = ()

    def __call__(
        self,
        request: Req,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _compat.CallIterator[Resp]:
        deadline = deadline_of(timeout)
        args = CallArgs(metadata, credentials, wait_for_ready, compression)
        m = self._m
        return self._later(
            metadata, timeout, wait_for_ready, lambda ep: _sync.unary_stream(m, ep, request, deadline, args)
        )


class _StreamUnary(
    _Multi[_compat.StreamUnaryMultiCallable[Req, Resp]], _compat.StreamUnaryMultiCallable[Req, Resp]
):
    __slots__ = ()

    def __call__(
        self,
        request_iterator: Iterator[Req],
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Resp:
        deadline = deadline_of(timeout)
        try:
            ep = self._pick(timeout, wait_for_ready, metadata)
        except PickError as e:
            raise FailedCall(e) from None
        args = CallArgs(metadata, credentials, wait_for_ready, compression)
        return _sync.stream_unary(self._m, ep, request_iterator, deadline, args)

    def with_call(
        self,
        request_iterator: Iterator[Req],
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Resp, grpc.Call]:
        deadline = deadline_of(timeout)
        try:
            ep = self._pick(timeout, wait_for_ready, metadata)
        except PickError as e:
            raise FailedCall(e) from None
        args = CallArgs(metadata, credentials, wait_for_ready, compression)
        return _sync.stream_unary_with_call(self._m, ep, request_iterator, deadline, args)

    def future(
        self,
        request_iterator: Iterator[Req],
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _compat.CallFuture[Resp]:
        deadline = deadline_of(timeout)
        args = CallArgs(metadata, credentials, wait_for_ready, compression)
        m = self._m
        return self._later(
            metadata,
            timeout,
            wait_for_ready,
            lambda ep: _sync.stream_unary_future(m, ep, request_iterator, deadline, args),
        )


class _StreamStream(
    _Multi[_compat.StreamStreamMultiCallable[Req, Resp]], _compat.StreamStreamMultiCallable[Req, Resp]
):
    __slots__ = ()

    def __call__(
        self,
        request_iterator: Iterator[Req],
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _compat.CallIterator[Resp]:
        deadline = deadline_of(timeout)
        args = CallArgs(metadata, credentials, wait_for_ready, compression)
        m = self._m
        return self._later(
            metadata,
            timeout,
            wait_for_ready,
            lambda ep: _sync.stream_stream(m, ep, request_iterator, deadline, args),
        )


class Channel(grpc.Channel):
    """A ``grpc.Channel`` balancing every call over the pods of one Kubernetes Service.

    Build it with :func:`lookaside_grpc.channel`. Each call picks a backend and goes over that backend's
    long-lived pooled channel. Connectivity (``subscribe``, ``grpc.channel_ready_future``) is READY only
    while the target has a ready endpoint. Dropped without ``close()``, it gives its balancer back when
    garbage collected.
    """

    def __init__(self, lease: Lease[Balancer], init_timeout: float = DEFAULT_INIT_TIMEOUT) -> None:
        self._lease = lease
        self._balancer = lease.balancer
        self._init_timeout = init_timeout
        self._closed = False
        self._subscribers: list[Callable[[grpc.ChannelConnectivity], None]] = []
        self._lock = threading.Lock()
        self._finalizer = _balancer.finalize_holder(self, lease)

    @property
    def target(self) -> Target:
        """The Kubernetes Service port the calls are balanced over."""
        return self._balancer.target

    @property
    def settings(self) -> Settings:
        """The settings this channel's (shared) balancer was built from."""
        return self._balancer.settings

    @property
    def mode(self) -> Mode:
        """:class:`Watch` or :class:`PerCall`."""
        return self._balancer.settings.mode

    @property
    def policy(self) -> RoutingPolicy:
        """The routing policy picking backends."""
        return self._balancer.policy

    def stats(self) -> Stats:
        """Counters of this channel's balancer (shared with channels/interceptors of equal settings)."""
        return self._balancer.stats()

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable[Req, Resp]:
        m = SyncMethods.unary_unary(
            self._balancer, method, request_serializer, response_deserializer, bool(_registered_method)
        )
        return _UnaryUnary(self, m)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable[Req, Resp]:
        m = SyncMethods.unary_stream(
            self._balancer, method, request_serializer, response_deserializer, bool(_registered_method)
        )
        return _UnaryStream(self, m)

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable[Req, Resp]:
        m = SyncMethods.stream_unary(
            self._balancer, method, request_serializer, response_deserializer, bool(_registered_method)
        )
        return _StreamUnary(self, m)

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable[Req, Resp]:
        m = SyncMethods.stream_stream(
            self._balancer, method, request_serializer, response_deserializer, bool(_registered_method)
        )
        return _StreamStream(self, m)

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        """Call ``callback`` with the connectivity of the target: READY while it has a ready endpoint,
        CONNECTING while the lookaside's first answer is on its way, TRANSIENT_FAILURE otherwise."""
        with self._lock:
            if self._closed:
                raise ValueError(CLOSED)
            self._subscribers.append(callback)
        if try_to_connect:
            self._balancer.resolver.connect()
        self._balancer.subscribe(callback)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            try:
                self._subscribers.remove(callback)
            except ValueError:
                pass
        self._balancer.unsubscribe(callback)

    def close(self) -> None:
        """Give the balancer back; the last holder stops its watch thread (joined) and closes every pooled
        channel and the lookaside channel. New calls raise ValueError, as on a closed grpc channel."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subscribers, self._subscribers = self._subscribers, []
        for cb in subscribers:
            self._balancer.unsubscribe(cb)
        self._finalizer.detach()
        _balancer.release_sync(self._lease)

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@overload
def channel(
    target: Target | str,
    *,
    namespace: str | None = None,
    port: str | int | None = None,
    lookaside: str | None = None,
    mode: Xds | XdsModeName,
    **options: Unpack[XdsOptions],
) -> XdsChannel: ...


@overload
def channel(
    target: Target | str,
    *,
    namespace: str | None = None,
    port: str | int | None = None,
    lookaside: str | None = None,
    init_timeout: float = DEFAULT_INIT_TIMEOUT,
    **options: Unpack[ClientOptions],
) -> Channel: ...


def channel(
    target: Target | str,
    *,
    namespace: str | None = None,
    port: str | int | None = None,
    lookaside: str | None = None,
    init_timeout: float | None = None,
    **options: Any,
) -> Channel | XdsChannel:
    """A channel balancing calls over the pods of a Kubernetes Service, via the lookaside.

    ``target``: a :class:`Target`, ``"service.namespace[.svc[.cluster.local]][:port]"``, or a bare Service
    name completed by ``namespace`` (default ``"default"``) and ``port``. A port is the Service port's name
    or number (``spec.ports[].port``, what you would dial inside the cluster: ``port=80`` for ``port: 80,
    targetPort: 50051``; calls go to each pod's own target port); a number that is only a target port is
    refused (INVALID_ARGUMENT naming the Service port); empty = the only or first port. ``lookaside``: its
    address (default ``$LOOKASIDE_ADDR``, else ``127.0.0.1:50055``).
    ``options``: see :class:`ClientOptions` (``mode=Watch()`` or
    ``PerCall(batch=..., pick_cache_ttl=..., throttle=...)``, ``policy``, ``credentials``, ``options``,
    ``lookaside_credentials``, ``tls_server_name``, ``max_staleness``, ``lookaside_keepalive``).

    Calls behave as on a grpc channel: without ``wait_for_ready`` a call fails fast with UNAVAILABLE when
    the target has no ready endpoint or the lookaside cannot be reached; while the first answer is on its
    way it waits up to its deadline (DEADLINE_EXCEEDED) or ``init_timeout`` (UNAVAILABLE). A unary-request
    call that fails with UNAVAILABLE before any response is retried once on another endpoint within its
    deadline, and the failing address is ejected for a cool-down (1 s doubling to 30 s, at most half the
    set). Channels with equal settings share one balancer (Watch stream, pool, counters).

    ``mode="xds"`` (or ``Xds()``) returns grpc's own ``xds:///<target>`` channel instead, bootstrapped to the
    lookaside (C-core resolves and picks; only ``credentials``, ``options`` and ``tls_server_name`` apply).
    """
    if is_xds(options.get("mode")):
        xs = xds_settings(target, namespace, port, lookaside, init_timeout, options)
        return XdsChannel(xs, options.get("credentials"))
    settings = make_settings(make_target(target, namespace, port), lookaside, options)
    return Channel(
        _balancer.lease_sync(settings), DEFAULT_INIT_TIMEOUT if init_timeout is None else init_timeout
    )


__all__ = ["Channel", "DEFAULT_INIT_TIMEOUT", "channel"]
