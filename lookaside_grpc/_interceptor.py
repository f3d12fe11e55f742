"""``LookasideInterceptor``: lookaside balancing for a channel the application already has.

``grpc.intercept_channel(channel, LookasideInterceptor(routes, ...))``: calls of the routed gRPC services go
over the shared per-backend channel pool (the same balancers and call engine as ``lookaside_grpc.channel``);
everything else, and any call that cannot be balanced, goes through the original channel unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar, Unpack, cast

import grpc

from lookaside_grpc import _compat
from lookaside_grpc._balancer import Balancer
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
            metadata = details.metadata
            ep = resolver.pick_nowait(balancer.policy, metadata) or resolver.ready(
                balancer.policy, False, metadata
            )
        except PickError as e:
            balancer.counters.fallback(e.reason)
            return continuation(details, request)
        blocking = shape == "unary_unary" and _is_blocking(continuation)
        if ep is not None:
            if blocking:
                return _blocking_unary(route, ep, request, deadline, details)
            return _begin(shape, route, ep, request, deadline, details)
        wait = core.wait_for(details.timeout)

        def later() -> object:
            try:
                ep = pick_sync(balancer, wait, False, grpc.StatusCode.UNAVAILABLE, metadata)
            except PickError as e:
                balancer.counters.fallback(e.reason)
                return continuation(details, request)
            if blocking:
                return _blocking_unary(route, ep, request, deadline, details)
            return _begin(shape, route, ep, request, deadline, details)

        if isinstance(resolver, WatchResolver) and not blocking:  # a blocking caller waits anyway
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


def _continuation_of(method: str) -> str:
    return f"_UnaryUnaryMultiCallable.{method}.<locals>.continuation"


#: The ``__qualname__`` of the continuation grpc's ``intercept_channel`` passes for a blocking unary-unary
#: call (``__call__``/``with_call``: it calls ``result()`` on what the interceptor returns, at once) -- as
#: opposed to ``future()``'s. Unchanged from grpcio 1.2x to 1.85; on any other shape of grpc the test
#: simply fails and every call takes the future path, which is correct, only dearer.
_BLOCKING_CONTINUATION = _continuation_of("_with_call")


def _is_blocking(continuation: object) -> bool:
    """Whether grpc waits for the call's result right after the interceptor returns (a blocking
    unary-unary call): then the call runs inline on the caller's thread, as grpc's own blocking calls do,
    instead of as a future completed by grpc's channel thread (a thread hop and a condition per call)."""
    return getattr(continuation, "__qualname__", None) == _BLOCKING_CONTINUATION


class _Outcome(_compat.CallFuture[object]):
    """A finished blocking call as grpc's interceptor machinery wants it back: a Call and a done Future
    (grpc's own ``_UnaryOutcome`` is private)."""

    __slots__ = ("_response", "_call")

    def __init__(self, response: object, call: grpc.Call) -> None:
        self._response = response
        self._call = call

    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._call.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._call.code()

    def details(self) -> str:
        return self._call.details()

    def debug_error_string(self) -> str:
        return str(getattr(self._call, "debug_error_string", lambda: "")())

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> object:
        return self._response

    def exception(self, timeout: float | None = None) -> Exception | None:
        return None

    def traceback(self, timeout: float | None = None) -> object:
        return None

    def add_done_callback(self, fn: Callable[[grpc.Future[object]], None]) -> None:
        fn(self)


def _blocking_unary(
    route: Route[Balancer],
    ep: Endpoint,
    request: object,
    deadline: float | None,
    details: grpc.ClientCallDetails,
) -> object:
    """A blocking unary-unary call, made inline (with its one retry); returned finished, as grpc's own
    continuation returns it: an outcome, or the RpcError (itself a Call and a Future) that ``result()``
    raises."""
    m = cast("_sync.SyncMethod[_sync.UU[object, object]]", _method(route, "unary_unary"))
    try:
        response, call = _sync.unary_unary_with_call(m, ep, request, deadline, _args(details))
    except grpc.RpcError as e:
        if isinstance(e, grpc.Future):
            return e
        raise
    return _Outcome(response, call)


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


class _RoutedUnaryUnary(_compat.UnaryUnaryMultiCallable[Req, Resp]):
    """:class:`InterceptedChannel`'s unary-unary multicallable: blocking calls (``__call__``,
    ``with_call``) of a routed method with a local pick go straight to the engine, as the factory's do, with
    none of grpc's interceptor machinery; everything else -- ``future()``, a cold start, a failing lookaside,
    an unrouted method -- takes the intercepted channel (the interceptor's own path, same behaviour)."""

    __slots__ = ("_core", "_method", "_intercepted")

    def __init__(
        self, core: RouterCore[Balancer], method: str, intercepted: grpc.UnaryUnaryMultiCallable[Req, Resp]
    ) -> None:
        self._core = core
        self._method = method
        self._intercepted = intercepted

    def _local(self, metadata: Metadata | None) -> tuple[Method[grpc.Channel, object], Endpoint] | None:
        """The engine's method and a local pick, when the call can go straight to a backend."""
        route = self._core.route_quiet(self._method)
        if route is None:
            return None
        balancer = route.balancer
        ep = balancer.resolver.pick_nowait(balancer.policy, metadata)
        return None if ep is None else (_method(route, "unary_unary"), ep)

    def __call__(
        self,
        request: Req,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Resp:
        local = self._local(metadata)
        if local is None:
            return self._intercepted(request, timeout, metadata, credentials, wait_for_ready, compression)
        m, ep = local
        args = CallArgs(metadata, credentials, wait_for_ready, compression)
        deadline = deadline_of(timeout)
        return _sync.unary_unary(m, ep, request, timeout, deadline, args)  # type: ignore[arg-type]

    def with_call(
        self,
        request: Req,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Resp, grpc.Call]:
        local = self._local(metadata)
        if local is None:
            return self._intercepted.with_call(
                request, timeout, metadata, credentials, wait_for_ready, compression
            )
        m, ep = local
        args = CallArgs(metadata, credentials, wait_for_ready, compression)
        return _sync.unary_unary_with_call(m, ep, request, deadline_of(timeout), args)  # type: ignore[arg-type]

    def future(
        self,
        request: Req,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _compat.CallFuture[Resp]:
        return self._intercepted.future(request, timeout, metadata, credentials, wait_for_ready, compression)


class InterceptedChannel(grpc.Channel):
    """The original channel with a :class:`LookasideInterceptor`, both built from the same credentials and
    options; ``close()`` closes both. Blocking unary calls of routed methods skip grpc's interceptor
    machinery (``grpc.intercept_channel`` costs client CPU per call even with an interceptor that does
    nothing); every other call goes through ``grpc.intercept_channel(original, interceptor)``."""

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
        intercepted = make(method, request_serializer, response_deserializer)
        return _RoutedUnaryUnary(self.interceptor._core, method, intercepted)

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
