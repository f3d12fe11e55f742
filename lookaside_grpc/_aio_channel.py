"""``Channel`` for grpc.aio: balances each call over pooled per-backend ``grpc.aio`` channels.

When a pick is available synchronously (watch mode with a known set, or a batched pick on hand) the real
grpc.aio call object is returned as is; otherwise a deferred call awaits the pick and then delegates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import grpc
import grpc.aio

from lookaside_grpc import _balancer
from lookaside_grpc._balancer import (
    DEFAULT_INIT_TIMEOUT,
    DEFAULT_MAX_STALENESS,
    AioBalancer,
    Options,
    make_target,
)
from lookaside_grpc._channel import ChannelCommon, _MultiCallable
from lookaside_grpc._errors import PickError, aio_error
from lookaside_grpc._health import AdaptiveThrottle
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._resolvers import WATCH, Mode
from lookaside_grpc._retry import AioUnaryStreamCall, AioUnaryUnaryCall, remaining

log = logging.getLogger(__name__)

DoneCallback = Callable[[Any], None]


class _Deferred:
    """A call waiting for its pick: every grpc.aio call method awaits the pick, then delegates."""

    def __init__(
        self, multi: _AioMultiCallable, request: Any, timeout: float | None, args: tuple[Any, ...]
    ) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._call: Any = None
        self._callbacks: list[DoneCallback] = []
        self._task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(
            self._start(multi, request, timeout, args)
        )
        self._task.add_done_callback(self._started)

    @staticmethod
    async def _start(
        multi: _AioMultiCallable, request: Any, timeout: float | None, args: tuple[Any, ...]
    ) -> Any:
        start = time.monotonic()
        try:
            ep = await multi._resolver.pick(multi._policy, timeout)
        except PickError as e:
            raise aio_error(e) from None
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - start))
        slot, mc = multi._entry(ep.address)
        call = multi._track(slot, mc, request, timeout, *args)
        wrap = multi._wrap
        return call if wrap is None else wrap(multi, slot, call, request, args)

    def _started(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._call = call = task.result()
            for cb in self._callbacks:
                call.add_done_callback(lambda _c, cb=cb: cb(self))
        else:
            for cb in self._callbacks:
                cb(self)
        self._callbacks.clear()

    async def _real(self) -> Any:
        return await self._task

    # RpcContext
    def cancelled(self) -> bool:
        return self._call.cancelled() if self._call is not None else self._task.cancelled()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._call.done() if self._call is not None else self._task.done()  # type: ignore[no-any-return]

    def time_remaining(self) -> float | None:
        if self._call is not None:
            return self._call.time_remaining()  # type: ignore[no-any-return]
        return remaining(self._deadline)

    def cancel(self) -> bool:
        if self._call is not None:
            return self._call.cancel()  # type: ignore[no-any-return]
        return self._task.cancel()

    def add_done_callback(self, callback: DoneCallback) -> None:
        if self._call is not None:
            self._call.add_done_callback(lambda _c: callback(self))
        elif self._task.done():
            callback(self)
        else:
            self._callbacks.append(callback)

    # Call
    async def _status(self, name: str) -> Any:
        try:
            call = await self._task
        except grpc.aio.AioRpcError as e:
            return getattr(e, name)()
        return await getattr(call, name)()

    async def initial_metadata(self) -> Any:
        return await self._status("initial_metadata")

    async def trailing_metadata(self) -> Any:
        return await self._status("trailing_metadata")

    async def code(self) -> grpc.StatusCode:
        return await self._status("code")  # type: ignore[no-any-return]

    async def details(self) -> str:
        return await self._status("details")  # type: ignore[no-any-return]

    async def wait_for_connection(self) -> None:
        await (await self._task).wait_for_connection()

    # unary response
    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()

    async def _response(self) -> Any:
        return await (await self._task)

    # streaming response
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        call = await self._task
        async for response in call:
            yield response

    async def read(self) -> Any:
        return await (await self._task).read()

    # streaming request
    async def write(self, request: Any) -> None:
        await (await self._task).write(request)

    async def done_writing(self) -> None:
        await (await self._task).done_writing()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} call={self._call!r} pending={not self._task.done()}>"


class _DeferredUnaryUnaryCall(_Deferred, grpc.aio.UnaryUnaryCall):  # type: ignore[misc]
    """Deferred unary-unary call."""


class _DeferredUnaryStreamCall(_Deferred, grpc.aio.UnaryStreamCall):  # type: ignore[misc]
    """Deferred unary-stream call."""


class _DeferredStreamUnaryCall(_Deferred, grpc.aio.StreamUnaryCall):  # type: ignore[misc]
    """Deferred stream-unary call."""


class _DeferredStreamStreamCall(_Deferred, grpc.aio.StreamStreamCall):  # type: ignore[misc]
    """Deferred stream-stream call."""


class _AioMultiCallable(_MultiCallable):
    """The four aio call shapes: real call on a synchronous pick, else a deferred call."""

    __slots__ = ()
    _deferred: type[_Deferred] = _Deferred
    #: The call wrapper carrying the one retry (unary-unary, unary-stream), or None: the real call as is.
    _wrap: Any = None

    def _invoke(self, request: Any, timeout: float | None, args: tuple[Any, ...]) -> Any:
        ep = self._resolver.pick_nowait(self._policy)
        if ep is None:
            return self._deferred(self, request, timeout, args)
        # counted, started, wrapped for the retry where the shape has one (as _Deferred._start, inline here)
        slot, mc = self._entry(ep.address)
        call = self._track(slot, mc, request, timeout, *args)
        wrap = self._wrap
        return call if wrap is None else wrap(self, slot, call, request, args)


class _UnaryRequest(_AioMultiCallable):
    """``__call__`` of the unary-request shapes, as grpc.aio spells it (keyword-only options)."""

    __slots__ = ()

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(request, timeout, (metadata, credentials, wait_for_ready, compression))


class _StreamRequest(_AioMultiCallable):
    """``__call__`` of the stream-request shapes, as grpc.aio spells it."""

    __slots__ = ()

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(request_iterator, timeout, (metadata, credentials, wait_for_ready, compression))


class _UnaryUnary(_UnaryRequest, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    __slots__ = ()
    _deferred = _DeferredUnaryUnaryCall
    _wrap = AioUnaryUnaryCall


class _UnaryStream(_UnaryRequest, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    __slots__ = ()
    _deferred = _DeferredUnaryStreamCall
    _wrap = AioUnaryStreamCall


class _StreamUnary(_StreamRequest, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    __slots__ = ()
    _deferred = _DeferredStreamUnaryCall


class _StreamStream(_StreamRequest, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    __slots__ = ()
    _deferred = _DeferredStreamStreamCall


class Channel(ChannelCommon, grpc.aio.Channel):
    """A ``grpc.aio.Channel`` balancing every call over the pods of one Kubernetes Service.

    Build it with :func:`lookaside_grpc.aio.channel`; use it in the event loop that makes the calls.
    """

    _shapes = {
        "unary_unary": _UnaryUnary,
        "unary_stream": _UnaryStream,
        "stream_unary": _StreamUnary,
        "stream_stream": _StreamStream,
    }

    def __init__(self, balancer: AioBalancer) -> None:
        super().__init__(balancer)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        """Release the balancer; the last user stops the watch task and closes every pooled channel (with
        ``grace``) and the lookaside channel."""
        if self._release():
            await self._balancer.aclose(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """State of the lookaside channel (the per-backend channels come and go)."""
        return self._balancer.lookaside_channel.get_state(try_to_connect)  # type: ignore[no-any-return]

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._balancer.lookaside_channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        """Wait until the lookaside channel is READY."""
        await self._balancer.lookaside_channel.channel_ready()


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
    """The grpc.aio twin of :func:`lookaside_grpc.channel`: same arguments, same ``watch`` default.

    Channels with identical settings made in the same running event loop share one balancer; outside a
    running loop each channel gets its own. Unary-unary and unary-stream calls carry the transparent retry
    (once, on another endpoint, when UNAVAILABLE arrives before any response message, within the call's
    deadline; the failing address is ejected): they return a thin wrapper around the real grpc.aio call,
    which does the retry while it is awaited / iterated. Stream-request calls are returned as is.
    """
    target = make_target(service, namespace, port, lookaside, mode, batch)
    try:
        loop: object = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
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
    share = loop is not None  # no sharing outside a running loop
    return Channel(_balancer.shared("aio", AioBalancer, target, mode, policy, settings, loop, share=share))
