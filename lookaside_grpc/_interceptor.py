"""``LookasideInterceptor``: lookaside balancing for a channel the application already has.

``grpc.intercept_channel(grpc.insecure_channel("greet:50051"), LookasideInterceptor(...))``: calls of the
routed gRPC services are sent over the shared per-backend channel pool (the same balancers as
``lookaside_grpc.channel``); everything else, and any call that cannot be routed, goes through the original
channel unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from lookaside_grpc._balancer import Balancer
from lookaside_grpc._channel import _MultiCallable, begin_call, begin_future
from lookaside_grpc._errors import PickError
from lookaside_grpc._pool import Slot
from lookaside_grpc._retry import UnaryStreamCall, UnaryUnaryFuture
from lookaside_grpc._routing import InterceptorCommon, Route, RouterCore


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()  # type: ignore[no-any-return]


def _multi(route: Route, kind: str) -> _MultiCallable:
    m = route.multi.get(kind)
    if m is None:
        m = route.multi[kind] = _MultiCallable(
            route.balancer, kind, route.method, _serialize, route.response_class.FromString, False
        )
    return m


def _start(
    core: RouterCore, route: Route, kind: str, timeout: float | None
) -> tuple[_MultiCallable, Slot[Any], Any, float | None] | None:
    """Pick and count the call on a backend: (the method's multicallable, slot, backend multicallable,
    timeout left); None (fallback counted) if no endpoint can be had in time."""
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
    multi = _multi(route, kind)
    slot, mc = multi._entry(ep.address)
    return multi, slot, mc, timeout


def _intercept(kind: str, begin: Callable[..., Any]) -> Callable[..., Any]:
    """The ``intercept_*`` method of shape ``kind``: route and pick, then ``begin(multi, slot, mc, request,
    timeout, args)`` starts the balanced call; else the original channel (``continuation``)."""

    def intercept(
        self: LookasideInterceptor, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        core = self._core
        route = core.route(client_call_details.method)
        if route is not None:
            started = _start(core, route, kind, client_call_details.timeout)
            if started is not None:
                multi, slot, mc, timeout = started
                d = client_call_details
                args = (d.metadata, d.credentials, d.wait_for_ready, d.compression)
                return begin(multi, slot, mc, request, timeout, args)
        return continuation(client_call_details, request)

    intercept.__name__ = intercept.__qualname__ = f"intercept_{kind}"
    return intercept


class LookasideInterceptor(
    InterceptorCommon,
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

    _kind = "sync"
    _balancer_factory = Balancer

    def close(self) -> None:
        """Release the balancers (the last user closes each: watch threads joined, pooled channels closed)."""
        for b in self._core.release_all():
            b.close()

    def __enter__(self) -> LookasideInterceptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    intercept_unary_unary = _intercept("unary_unary", UnaryUnaryFuture)
    intercept_unary_stream = _intercept("unary_stream", UnaryStreamCall)
    _intercept_stream_unary = _intercept("stream_unary", begin_future)
    _intercept_stream_stream = _intercept("stream_stream", begin_call)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._intercept_stream_unary(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._intercept_stream_stream(continuation, client_call_details, request_iterator)
