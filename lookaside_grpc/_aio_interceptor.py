"""``lookaside_grpc.aio.LookasideInterceptor``: the grpc.aio twin of the sync interceptor.

grpc.aio sorts a channel's interceptors by shape (one object lands in one shape's list only), so the four
shapes are four objects sharing one core: pass ``LookasideInterceptor(...).interceptors`` (or
``lookaside_grpc.aio.interceptors(...)``) as ``interceptors=``.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Unpack

import grpc
import grpc.aio

from lookaside_grpc._balancer import AioBalancer
from lookaside_grpc._calls import _aio
from lookaside_grpc._calls._engine import NO_ARGS, AioMethods, CallArgs, Method, deadline_of, pick_aio
from lookaside_grpc._errors import PickError
from lookaside_grpc._routing import DEFAULT_ROUTE_WAIT, Route, RouterCore, lease_aio, serialize
from lookaside_grpc._settings import ClientOptions
from lookaside_grpc._stats import Stats
from lookaside_grpc._target import Target

_FACTORIES: dict[str, Callable[..., Method[grpc.aio.Channel, object]]] = {
    "unary_unary": AioMethods.unary_unary,
    "unary_stream": AioMethods.unary_stream,
    "stream_unary": AioMethods.stream_unary,
    "stream_stream": AioMethods.stream_stream,
}


def _loop_key() -> object:
    return asyncio.get_running_loop()


def _method(route: Route[AioBalancer], shape: str) -> _aio.AioMethod:
    m = route.methods.get(shape)
    if m is None:
        m = route.methods[shape] = _FACTORIES[shape](
            route.balancer, route.method, serialize, route.response_class.FromString, False
        )
    return m  # type: ignore[return-value]


def _fast(
    core: RouterCore[AioBalancer], shape: str, details: grpc.aio.ClientCallDetails, request: object
) -> object:
    """The hot path of every interceptor: a routed call with a local pick starts at once (no coroutine of
    ours awaited); ``_NO_ROUTE`` for a call that goes to the original channel; None when the pick must wait
    (then :func:`_intercept` does it)."""
    route = core.route(details.method)
    if route is None:
        return _NO_ROUTE
    balancer = route.balancer
    metadata, credentials, wait_for_ready = details.metadata, details.credentials, details.wait_for_ready
    ep = balancer.resolver.pick_nowait(balancer.policy, metadata)
    if ep is None:
        return None
    # grpc.aio does not show compression to interceptors: the channel's default applies
    if not metadata and credentials is None and wait_for_ready is None:
        args = NO_ARGS
    else:
        args = CallArgs(metadata, credentials, wait_for_ready, None)  # type: ignore[arg-type]
    return _aio.start(shape, _method(route, shape), request, deadline_of(details.timeout), args, ep)


#: :func:`_fast`'s answer for a call that goes to the original channel.
_NO_ROUTE = object()


async def _intercept(
    core: RouterCore[AioBalancer],
    shape: str,
    continuation: Callable[[grpc.aio.ClientCallDetails, object], Awaitable[object]],
    details: grpc.aio.ClientCallDetails,
    request: object,
) -> object:
    """Balance the call, or hand it to the original channel (``continuation``)."""
    deadline = deadline_of(details.timeout)
    route = core.route(details.method)
    if route is not None:
        balancer = route.balancer
        try:
            ep = await pick_aio(
                balancer, core.wait_for(details.timeout), False, grpc.StatusCode.UNAVAILABLE, details.metadata
            )
        except PickError as e:
            balancer.counters.fallback(e.reason)
        else:
            # grpc.aio does not show compression to interceptors: the channel's default applies
            args = CallArgs(details.metadata, details.credentials, details.wait_for_ready, None)  # type: ignore[arg-type]
            return _aio.start(shape, _method(route, shape), request, deadline, args, ep)
    return await continuation(details, request)


class _Shape:
    def __init__(self, core: RouterCore[AioBalancer]) -> None:
        self._core = core


class _UnaryUnary(_Shape, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, object], Awaitable[object]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: object,
    ) -> object:
        started = _fast(self._core, "unary_unary", client_call_details, request)
        if started is _NO_ROUTE:
            return await continuation(client_call_details, request)
        if started is not None:
            return started
        return await _intercept(self._core, "unary_unary", continuation, client_call_details, request)


class _UnaryStream(_Shape, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, object], Awaitable[object]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: object,
    ) -> object:
        started = _fast(self._core, "unary_stream", client_call_details, request)
        if started is _NO_ROUTE:
            return await continuation(client_call_details, request)
        if started is not None:
            return started
        return await _intercept(self._core, "unary_stream", continuation, client_call_details, request)


class _StreamUnary(_Shape, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, object], Awaitable[object]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: object,
    ) -> object:
        started = _fast(self._core, "stream_unary", client_call_details, request_iterator)
        if started is _NO_ROUTE:
            return await continuation(client_call_details, request_iterator)
        if started is not None:
            return started
        return await _intercept(
            self._core, "stream_unary", continuation, client_call_details, request_iterator
        )


class _StreamStream(_Shape, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, object], Awaitable[object]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: object,
    ) -> object:
        started = _fast(self._core, "stream_stream", client_call_details, request_iterator)
        if started is _NO_ROUTE:
            return await continuation(client_call_details, request_iterator)
        if started is not None:
            return started
        return await _intercept(
            self._core, "stream_stream", continuation, client_call_details, request_iterator
        )


class LookasideInterceptor(_UnaryUnary):
    """grpc.aio lookaside interceptor: same arguments and behaviour as the sync
    :class:`lookaside_grpc.LookasideInterceptor` (grpc.aio does not show compression to interceptors, so the
    channel's default compression applies to balanced calls).

    ``grpc.aio.insecure_channel(addr, interceptors=LookasideInterceptor(...).interceptors)`` balances all
    four call shapes. Balancers are made per running event loop; ``await close()`` (or ``async with``)
    gives them back.
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
        super().__init__(
            RouterCore(
                lookaside,
                routes or {},
                options,
                route_wait=route_wait,
                strict=strict,
                lease=lease_aio,
                loop_key=_loop_key,
            )
        )
        self._finalizer = weakref.finalize(self, self._core.release_in_gc)

    @functools.cached_property
    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """One interceptor per call shape, for ``grpc.aio.*_channel(interceptors=...)``."""
        core = self._core
        return [self, _UnaryStream(core), _StreamUnary(core), _StreamStream(core)]

    @property
    def routes(self) -> dict[str, Target]:
        """gRPC service name -> target."""
        return dict(self._core.routes)

    def stats(self) -> Stats:
        """Counters: the interceptor's own fallbacks plus those of the balancers it uses."""
        return self._core.stats()

    async def close(self, grace: float | None = None) -> None:
        """Give the balancers back; the last holder of each closes it."""
        self._finalizer.detach()
        await asyncio.gather(
            *(lease.balancer.aclose(grace) for lease in self._core.release_all()), return_exceptions=True
        )

    async def __aenter__(self) -> LookasideInterceptor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def interceptors(
    lookaside: str | None = None,
    routes: Mapping[str, Target | str] | None = None,
    *,
    route_wait: float = DEFAULT_ROUTE_WAIT,
    strict: bool = False,
    **options: Unpack[ClientOptions],
) -> list[grpc.aio.ClientInterceptor]:
    """The four grpc.aio interceptors (one per call shape) of one :class:`LookasideInterceptor` (to close
    them, keep the interceptor: ``LookasideInterceptor(...).interceptors``)."""
    return LookasideInterceptor(
        lookaside, routes, route_wait=route_wait, strict=strict, **options
    ).interceptors


def intercepted_channel(
    address: str,
    routes: Mapping[str, Target | str],
    *,
    lookaside: str | None = None,
    route_wait: float = DEFAULT_ROUTE_WAIT,
    strict: bool = False,
    **options: Unpack[ClientOptions],
) -> tuple[grpc.aio.Channel, LookasideInterceptor]:
    """A grpc.aio channel to ``address`` (the fallback path) with the interceptors, both built from the same
    ``credentials`` and ``options``; close both (``await interceptor.close()`` after the channel)."""
    interceptor = LookasideInterceptor(lookaside, routes, route_wait=route_wait, strict=strict, **options)
    creds = options.get("credentials")
    opts = list(options.get("options", ()))
    if creds is None:
        ch = grpc.aio.insecure_channel(address, opts, interceptors=interceptor.interceptors)
    else:
        ch = grpc.aio.secure_channel(address, creds, opts, interceptors=interceptor.interceptors)
    return ch, interceptor
