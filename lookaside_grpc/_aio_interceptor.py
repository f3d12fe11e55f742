"""``lookaside_grpc.aio.LookasideInterceptor``: the grpc.aio twin of the sync interceptor.

grpc.aio sorts a channel's interceptors by shape (one object lands in one shape's list only), so the four
shapes are four objects sharing one core: pass ``LookasideInterceptor(...).interceptors`` (or
``lookaside_grpc.aio.interceptors(...)``) as ``interceptors=``. The ``LookasideInterceptor`` object itself is
the unary-unary one, so ``interceptors=[LookasideInterceptor(...)]`` balances unary-unary calls only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import grpc
import grpc.aio

from lookaside_grpc._balancer import DEFAULT_MAX_STALENESS, AioBalancer, Options
from lookaside_grpc._errors import PickError
from lookaside_grpc._health import AdaptiveThrottle, retryable
from lookaside_grpc._interceptor import _multi
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._pool import Slot
from lookaside_grpc._resolvers import WATCH, Mode
from lookaside_grpc._routing import DEFAULT_ROUTE_WAIT, RouterCore, Target
from lookaside_grpc._stats import Stats


def _loop_key() -> object:
    return asyncio.get_running_loop()


async def _start(
    core: RouterCore, details: Any, kind: str
) -> tuple[Any, Slot[Any], Any, float | None] | None:
    """Pick and count the call; (the method's multicallable, slot, backend multicallable, timeout), or None
    to use the original channel."""
    route = core.route(details.method)
    if route is None:
        return None
    timeout = details.timeout
    ep = route.resolver.pick_nowait(route.policy)
    if ep is None:
        start = time.monotonic()
        try:
            ep = await route.resolver.pick(route.policy, core.wait_for(timeout))
        except PickError as e:
            route.balancer.counters.fallback(e.reason)
            return None
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - start))
    multi = _multi(route, kind)
    slot, mc = multi._entry(ep.address)
    return multi, slot, mc, timeout


def _call(multi: Any, slot: Slot[Any], mc: Any, request: Any, timeout: float | None, details: Any) -> Any:
    try:
        call = mc(
            request,
            timeout=timeout,
            metadata=details.metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )
    except BaseException:
        slot.release()
        raise
    call.add_done_callback(multi._done_callback(slot))
    return call


class _Shape:
    def __init__(self, core: RouterCore) -> None:
        self._core = core


class _UnaryUnary(_Shape, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        started = await _start(self._core, client_call_details, "unary_unary")
        if started is None:
            return await continuation(client_call_details, request)
        multi, slot, mc, timeout = started
        deadline = None if timeout is None else time.monotonic() + timeout
        call = _call(multi, slot, mc, request, timeout, client_call_details)
        try:
            await call
        except grpc.aio.AioRpcError as e:
            if not retryable(e):
                return call  # the error reaches the caller when it awaits the call
            nxt = multi._next_attempt(slot.address, deadline)
            if nxt is None:
                return call
            slot2, mc2 = nxt
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            return _call(multi, slot2, mc2, request, remaining, client_call_details)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if multi._probation:
            multi._balancer.ejector.succeeded(slot.address)
        return call


class _UnaryStream(_Shape, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        started = await _start(self._core, client_call_details, "unary_stream")
        if started is None:
            return await continuation(client_call_details, request)
        multi, slot, mc, timeout = started
        return _call(multi, slot, mc, request, timeout, client_call_details)


class _StreamUnary(_Shape, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        started = await _start(self._core, client_call_details, "stream_unary")
        if started is None:
            return await continuation(client_call_details, request_iterator)
        multi, slot, mc, timeout = started
        return _call(multi, slot, mc, request_iterator, timeout, client_call_details)


class _StreamStream(_Shape, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        started = await _start(self._core, client_call_details, "stream_stream")
        if started is None:
            return await continuation(client_call_details, request_iterator)
        multi, slot, mc, timeout = started
        return _call(multi, slot, mc, request_iterator, timeout, client_call_details)


class LookasideInterceptor(_UnaryUnary):
    """grpc.aio lookaside interceptor; same arguments and behaviour as the sync
    :class:`lookaside_grpc.LookasideInterceptor` (grpc.aio does not show compression to interceptors, so the
    channel's default compression applies to balanced calls).

    ``grpc.aio.insecure_channel(addr, interceptors=LookasideInterceptor(...).interceptors)`` balances all
    four call shapes. Balancers are made per running event loop; ``await close()`` releases them.
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
        core = RouterCore(
            "aio",
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
            balancer_factory=AioBalancer,
            loop_key=_loop_key,
        )
        super().__init__(core)
        #: One interceptor per call shape, for ``grpc.aio.*_channel(interceptors=...)``.
        self.interceptors: list[Any] = [self, _UnaryStream(core), _StreamUnary(core), _StreamStream(core)]

    @property
    def routes(self) -> dict[str, Target]:
        return dict(self._core.routes)

    def stats(self) -> Stats:
        """Counters: the interceptor's own fallbacks plus those of the balancers it uses."""
        return self._core.stats()

    async def close(self, grace: float | None = None) -> None:
        """Release the balancers; the last user of each closes it."""
        await asyncio.gather(*(b.aclose(grace) for b in self._core.release_all()), return_exceptions=True)


def interceptors(
    lookaside: str = "127.0.0.1:50055", routes: Mapping[str, Target | str] | None = None, **kwargs: Any
) -> list[Any]:
    """The four grpc.aio interceptors (one per call shape) of one :class:`LookasideInterceptor`."""
    return LookasideInterceptor(lookaside, routes, **kwargs).interceptors
