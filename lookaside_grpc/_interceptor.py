"""``LookasideInterceptor``: lookaside balancing for a channel the application already has.

``grpc.intercept_channel(grpc.insecure_channel("greet:50051"), LookasideInterceptor(...))``: calls of the
routed gRPC services are sent over the shared per-backend channel pool (the same balancers as
``lookaside_grpc.channel``); everything else, and any call that cannot be routed, goes through the original
channel unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import grpc

from lookaside_grpc._balancer import DEFAULT_MAX_STALENESS, Balancer, Options
from lookaside_grpc._channel import _MultiCallable
from lookaside_grpc._errors import PickError
from lookaside_grpc._health import AdaptiveThrottle
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._pool import Slot
from lookaside_grpc._resolvers import WATCH, Mode
from lookaside_grpc._retry import UnaryStreamCall, UnaryUnaryFuture
from lookaside_grpc._routing import DEFAULT_ROUTE_WAIT, Route, RouterCore, Target
from lookaside_grpc._stats import Stats


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()  # type: ignore[no-any-return]


def _multi(route: Route, kind: str) -> _MultiCallable:
    m = route.multi.get(kind)
    if m is None:
        m = route.multi[kind] = _MultiCallable(
            route.balancer, kind, route.method, _serialize, route.response_class.FromString, False
        )
    return m


def _args(details: Any) -> tuple[Any, ...]:
    return (details.metadata, details.credentials, details.wait_for_ready, details.compression)


def _start(
    core: RouterCore, route: Route, kind: str, timeout: float | None
) -> tuple[Slot[Any], Any, float | None] | None:
    """Pick and count the call on a backend; None (fallback counted) if no endpoint can be had in time."""
    ep = route.resolver.pick_nowait(route.policy)
    if ep is None:
        start = time.monotonic()
        try:
            ep = route.resolver.pick(route.policy, core.wait_for(timeout))
        except PickError as e:
            route.balancer.counters.fallback(e.reason)
            return None
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - start))
    slot, mc = _multi(route, kind)._entry(ep.address)
    return slot, mc, timeout


class LookasideInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Balances the calls of the routed gRPC services of an existing channel via the lookaside.

    ``routes`` maps fully-qualified gRPC service names (``"greet.GreetService"``) to a :class:`Target` or a
    ``"service[.namespace][:port]"`` string. Per call the interceptor picks an endpoint (per ``mode``) and
    sends the call over the shared per-backend channel pool (the same balancers as
    :func:`lookaside_grpc.channel`, shared when the settings match). Request/response classes come from the
    protobuf descriptor pool (the generated ``*_pb2`` module must be imported). A call goes through the
    original channel unchanged when its method is unknown to the pool, its service has no route, or no
    endpoint can be had within ``route_wait`` seconds (at most half the call's timeout), or the last set
    is older than ``max_staleness`` seconds. Unary-request calls failing with UNAVAILABLE before any response
    are retried once on another endpoint (the failing one is ejected for a cool-down). Other arguments as
    :func:`lookaside_grpc.channel`.
    """

    def __init__(
        self,
        lookaside: str = "127.0.0.1:50055",
        routes: Mapping[str, Target | str] | None = None,
        *,
        mode: Mode = WATCH,
        policy: str | RoutingPolicy = "round_robin",
        credentials: grpc.ChannelCredentials | None = None,
        options: Options = (),
        lookaside_credentials: grpc.ChannelCredentials | None = None,
        batch: int = 1,
        route_wait: float = DEFAULT_ROUTE_WAIT,
        max_staleness: float | None = DEFAULT_MAX_STALENESS,
        pick_cache_ttl: float = 0.0,
        throttle: bool | AdaptiveThrottle = True,
    ) -> None:
        self._core = RouterCore(
            "sync",
            lookaside,
            routes or {},
            mode=mode,
            policy=policy,
            credentials=credentials,
            options=options,
            lookaside_credentials=lookaside_credentials,
            batch=batch,
            route_wait=route_wait,
            max_staleness=max_staleness,
            pick_cache_ttl=pick_cache_ttl,
            throttle=throttle,
            balancer_factory=Balancer,
        )

    @property
    def routes(self) -> dict[str, Target]:
        """gRPC service name -> target."""
        return dict(self._core.routes)

    def stats(self) -> Stats:
        """Counters: the interceptor's own fallbacks plus those of the balancers it uses."""
        return self._core.stats()

    def close(self) -> None:
        """Release the balancers (the last user closes each: watch threads joined, pooled channels closed)."""
        for b in self._core.release_all():
            b.close()

    def __enter__(self) -> LookasideInterceptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        core = self._core
        route = core.route(client_call_details.method)
        if route is not None:
            started = _start(core, route, "unary_unary", client_call_details.timeout)
            if started is not None:
                slot, mc, timeout = started
                return UnaryUnaryFuture(
                    _multi(route, "unary_unary"), slot, mc, request, timeout, _args(client_call_details)
                )
        return continuation(client_call_details, request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        core = self._core
        route = core.route(client_call_details.method)
        if route is not None:
            started = _start(core, route, "unary_stream", client_call_details.timeout)
            if started is not None:
                slot, mc, timeout = started
                return UnaryStreamCall(
                    _multi(route, "unary_stream"), slot, mc, request, timeout, _args(client_call_details)
                )
        return continuation(client_call_details, request)

    def _streaming_request(self, kind: str, continuation: Any, details: Any, request_iterator: Any) -> Any:
        core = self._core
        route = core.route(details.method)
        if route is not None:
            started = _start(core, route, kind, details.timeout)
            if started is not None:
                slot, mc, timeout = started
                try:
                    call = (mc.future if kind == "stream_unary" else mc)(
                        request_iterator, timeout, *_args(details)
                    )
                except BaseException:
                    slot.release()
                    raise
                call.add_done_callback(_multi(route, kind)._done_callback(slot))
                return call
        return continuation(details, request_iterator)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._streaming_request("stream_unary", continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._streaming_request("stream_stream", continuation, client_call_details, request_iterator)
