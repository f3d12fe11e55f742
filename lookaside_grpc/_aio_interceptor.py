"""``lookaside_grpc.aio.LookasideInterceptor``: the grpc.aio twin of the sync interceptor.

grpc.aio sorts a channel's interceptors by shape (one object lands in one shape's list only), so the four
shapes are four objects sharing one core: pass ``LookasideInterceptor(...).interceptors`` (or
``lookaside_grpc.aio.interceptors(...)``) as ``interceptors=``. The ``LookasideInterceptor`` object itself is
the unary-unary one, so ``interceptors=[LookasideInterceptor(...)]`` balances unary-unary calls only.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import grpc.aio

from lookaside_grpc._balancer import AioBalancer
from lookaside_grpc._errors import PickError
from lookaside_grpc._health import retryable
from lookaside_grpc._interceptor import _multi
from lookaside_grpc._pool import Slot
from lookaside_grpc._routing import InterceptorCommon, RouterCore, Target


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
    # grpc.aio does not show compression to interceptors: the channel's default applies
    return multi._track(
        slot, mc, request, timeout, details.metadata, details.credentials, details.wait_for_ready, None
    )


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
            d = client_call_details
            retry = multi._retry_call(
                slot.address, deadline, request, (d.metadata, d.credentials, d.wait_for_ready, None)
            )
            return call if retry is None else retry[1]
        except asyncio.CancelledError:
            call.cancel()
            raise
        multi._succeeded(slot.address)
        return call


def _passthrough(kind: str) -> Callable[..., Any]:
    """The ``intercept_*`` method of the shapes without a retry: the balanced call as is."""

    async def intercept(self: _Shape, continuation: Any, client_call_details: Any, request: Any) -> Any:
        started = await _start(self._core, client_call_details, kind)
        if started is None:
            return await continuation(client_call_details, request)
        multi, slot, mc, timeout = started
        return _call(multi, slot, mc, request, timeout, client_call_details)

    intercept.__name__ = intercept.__qualname__ = f"intercept_{kind}"
    return intercept


class _UnaryStream(_Shape, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _passthrough("unary_stream")


class _StreamUnary(_Shape, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _passthrough("stream_unary")


class _StreamStream(_Shape, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _passthrough("stream_stream")


class LookasideInterceptor(InterceptorCommon, _UnaryUnary):
    """grpc.aio lookaside interceptor; same arguments and behaviour as the sync
    :class:`lookaside_grpc.LookasideInterceptor` (grpc.aio does not show compression to interceptors, so the
    channel's default compression applies to balanced calls).

    ``grpc.aio.insecure_channel(addr, interceptors=LookasideInterceptor(...).interceptors)`` balances all
    four call shapes. Balancers are made per running event loop; ``await close()`` releases them.
    """

    _kind = "aio"
    _balancer_factory = AioBalancer
    _loop_key = staticmethod(_loop_key)

    @functools.cached_property
    def interceptors(self) -> list[Any]:
        """One interceptor per call shape, for ``grpc.aio.*_channel(interceptors=...)``."""
        core = self._core
        return [self, _UnaryStream(core), _StreamUnary(core), _StreamStream(core)]

    async def close(self, grace: float | None = None) -> None:
        """Release the balancers; the last user of each closes it."""
        await asyncio.gather(*(b.aclose(grace) for b in self._core.release_all()), return_exceptions=True)


def interceptors(
    lookaside: str = "127.0.0.1:50055", routes: Mapping[str, Target | str] | None = None, **kwargs: Any
) -> list[Any]:
    """The four grpc.aio interceptors (one per call shape) of one :class:`LookasideInterceptor`."""
    return LookasideInterceptor(lookaside, routes, **kwargs).interceptors
