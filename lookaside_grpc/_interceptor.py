"""``LookasideInterceptor``: lookaside balancing for a channel the application already has.

``grpc.intercept_channel(channel, LookasideInterceptor(routes, ...))``: calls of the routed gRPC services go
over the shared per-backend channel pool (the same balancers and call engine as ``lookaside_grpc.channel``);
everything else, and any call that cannot be balanced, goes through the original channel unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar, Unpack

import grpc

from lookaside_grpc._balancer import Balancer
from lookaside_grpc._calls import _sync
from lookaside_grpc._calls._engine import (
    CallArgs,
    Deserializer,
    Method,
    Serializer,
    SyncMethods,
    deadline_of,
    pick_sync,
    with_registered,
)
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._errors import PickError
from lookaside_grpc._resolvers import WatchResolver
from lookaside_grpc._routing import DEFAULT_ROUTE_WAIT, Route, RouterCore, lease_sync, serialize
from lookaside_grpc._settings import ClientOptions
from lookaside_grpc._stats import Stats
from lookaside_grpc._target import Target

M = TypeVar("M")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
_FACTORIES: dict[str, Callable[..., Method[grpc.Channel, object]]] = {
    "unary_unary": SyncMethods.unary_unary,
    "unary_stream": SyncMethods.unary_stream,
    "stream_unary": SyncMethods.stream_unary,
    "stream_stream": SyncMethods.stream_stream,
}


def _no_loop() -> object:
    return None


def _method(route: Route[Balancer], shape: str) -> Method[grpc.Channel, object]:
    m = route.methods.get(shape)
    if m is None:
        m = route.methods[shape] = _FACTORIES[shape](
            route.balancer, route.method, serialize, route.response_class.FromString, False
        )
    return m  # type: ignore[return-value]


def _args(d: grpc.ClientCallDetails) -> CallArgs:
    return CallArgs(d.metadata, d.credentials, d.wait_for_ready, getattr(d, "compression", None))


class LookasideInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Balances the calls of the routed gRPC services of an existing channel via the lookaside.

    ``lookaside``: its address (default ``$LOOKASIDE_ADDR``, else ``127.0.0.1:50055``). ``routes`` maps fully
    gRPC service names (``"greet.GreetService"``) to a :class:`Target` or
    ``"service.namespace[:port]"``. Request/response classes come from the protobuf descriptor pool (a
    service whose ``.proto`` holds only the service is found too); a route naming a service the pool does
    not know logs a WARNING and is counted (``strict=True`` raises ValueError instead). A call uses the
    original channel when its service has no route or is unknown, when no endpoint arrives within
    ``route_wait`` seconds on a cold start (at most half the call's timeout), and at once while the
    lookaside is failing with no usable set. Unary-request calls failing with UNAVAILABLE before any
    response are retried once on another endpoint.

    ``options``: :class:`ClientOptions`, as ``channel()``. Backends are dialled with ``credentials`` and
    ``options``: pass the ones the wrapped channel was built with (grpc does not expose a channel's own),
    or build both at once with :func:`lookaside_grpc.intercepted_channel`.
    """

    def __init__(
        self,
        lookaside: str | None = None,
        routes: Mapping[str, Target | str] | None = None,
        *,
        route_wait: float = DEFAULT_ROUTE_WAIT,
        strict: bool = False,
        **options: Unpack[ClientOptions],
    ) -> None:
        self._core: RouterCore[Balancer] = RouterCore(
            lookaside,
            routes or {},
            options,
            route_wait=route_wait,
            strict=strict,
            lease=lease_sync,
            loop_key=_no_loop,
        )
        self._finalizer = weakref.finalize(self, self._core.release_in_gc)

    @property
    def routes(self) -> dict[str, Target]:
        """gRPC service name -> target."""
        return dict(self._core.routes)

    def stats(self) -> Stats:
        """Counters: the interceptor's own fallbacks plus those of the balancers it uses."""
        return self._core.stats()

    def close(self) -> None:
        """Give the balancers back (the last holder of each closes it); later calls raise ValueError."""
        self._finalizer.detach()
        for lease in self._core.release_all():  # already given back: these were the last holders
            lease.balancer.close()

    def __enter__(self) -> LookasideInterceptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _intercept(
        self,
        shape: str,
        continuation: Callable[[grpc.ClientCallDetails, object], object],
        details: grpc.ClientCallDetails,
        request: object,
    ) -> object:
        """Balance the call, or hand it to the original channel (``continuation``): at once while the
        lookaside is failing; on a cold start (watch mode, first answer on its way) the call is returned at
        once and starts, balanced or not, when the pick arrives or ``route_wait`` runs out."""
        core = self._core
        route = core.route(details.method)
        if route is None:
            return continuation(details, request)
        deadline = deadline_of(details.timeout)
        balancer = route.balancer
        resolver = balancer.resolver
        try:
            ep = resolver.pick_nowait(balancer.policy) or resolver.ready(balancer.policy, False)
        except PickError as e:
            balancer.counters.fallback(e.reason)
            return continuation(details, request)
        if ep is not None:
            return _begin(shape, route, ep, request, deadline, details)
        wait = core.wait_for(details.timeout)

        def later() -> object:
            try:
                ep = pick_sync(balancer, wait, False, grpc.StatusCode.UNAVAILABLE)
            except PickError as e:
                balancer.counters.fallback(e.reason)
                return continuation(details, request)
            return _begin(shape, route, ep, request, deadline, details)

        if isinstance(resolver, WatchResolver):
            return _sync.DeferredCall(later)
        return later()  # per_call: the Resolve, inline

    def intercept_unary_unary(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.ClientCallDetails, object], object],
        client_call_details: grpc.ClientCallDetails,
        request: object,
    ) -> object:
        return self._intercept("unary_unary", continuation, client_call_details, request)

    def intercept_unary_stream(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.ClientCallDetails, object], object],
        client_call_details: grpc.ClientCallDetails,
        request: object,
    ) -> object:
        return self._intercept("unary_stream", continuation, client_call_details, request)

    def intercept_stream_unary(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.ClientCallDetails, object], object],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[object],
    ) -> object:
        return self._intercept("stream_unary", continuation, client_call_details, request_iterator)

    def intercept_stream_stream(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.ClientCallDetails, object], object],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[object],
    ) -> object:
        return self._intercept("stream_stream", continuation, client_call_details, request_iterator)


def _begin(
    shape: str,
    route: Route[Balancer],
    ep: Endpoint,
    request: object,
    deadline: float | None,
    details: grpc.ClientCallDetails,
) -> object:
    """Start the balanced call of ``shape`` on ``ep`` through the engine."""
    m = _method(route, shape)
    a = _args(details)
    if shape == "unary_unary":
        return _sync.UnaryUnaryFuture(m, ep, request, deadline, a)  # type: ignore[arg-type]
    if shape == "unary_stream":
        return _sync.unary_stream(m, ep, request, deadline, a)  # type: ignore[arg-type]
    if shape == "stream_unary":
        return _sync.stream_unary_future(m, ep, request, deadline, a)  # type: ignore[arg-type]
    return _sync.stream_stream(m, ep, request, deadline, a)  # type: ignore[arg-type]


class InterceptedChannel(grpc.Channel):
    """The original channel with a :class:`LookasideInterceptor`, both built from the same credentials and
    options; ``close()`` closes both."""

    def __init__(self, original: grpc.Channel, interceptor: LookasideInterceptor) -> None:
        self.original = original
        self.interceptor = interceptor
        self._channel = grpc.intercept_channel(original, interceptor)

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable[Req, Resp]:
        make = with_registered(self._channel.unary_unary, bool(_registered_method))
        return make(method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable[Req, Resp]:
        make = with_registered(self._channel.unary_stream, bool(_registered_method))
        return make(method, request_serializer, response_deserializer)

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable[Req, Resp]:
        make = with_registered(self._channel.stream_unary, bool(_registered_method))
        return make(method, request_serializer, response_deserializer)

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable[Req, Resp]:
        make = with_registered(self._channel.stream_stream, bool(_registered_method))
        return make(method, request_serializer, response_deserializer)

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        self.original.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self.original.unsubscribe(callback)

    def close(self) -> None:
        self.interceptor.close()
        self._channel.close()

    def __enter__(self) -> InterceptedChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def intercepted_channel(
    address: str,
    routes: Mapping[str, Target | str],
    *,
    lookaside: str | None = None,
    route_wait: float = DEFAULT_ROUTE_WAIT,
    strict: bool = False,
    **options: Unpack[ClientOptions],
) -> InterceptedChannel:
    """A channel to ``address`` (the fallback path) whose routed calls are balanced: the original channel
    and the backends are dialled with the same ``credentials`` and ``options`` (message size limits,
    keepalive, ...)."""
    creds = options.get("credentials")
    opts = list(options.get("options", ()))
    original = (
        grpc.secure_channel(address, creds, opts)
        if creds is not None
        else grpc.insecure_channel(address, opts)
    )
    try:
        interceptor = LookasideInterceptor(lookaside, routes, route_wait=route_wait, strict=strict, **options)
    except BaseException:
        original.close()
        raise
    return InterceptedChannel(original, interceptor)


__all__ = ["InterceptedChannel", "LookasideInterceptor", "intercepted_channel"]
