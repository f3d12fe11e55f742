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
    balancer_key,
    make_target,
)
from lookaside_grpc._channel import _MultiCallable
from lookaside_grpc._errors import PickError, aio_error
from lookaside_grpc._health import AdaptiveThrottle
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._resolvers import WATCH, Mode
from lookaside_grpc._retry import AioUnaryStreamCall, AioUnaryUnaryCall
from lookaside_grpc._stats import Stats

log = logging.getLogger(__name__)

DoneCallback = Callable[[Any], None]


class _Deferred:
    """A call waiting for its pick: every grpc.aio call method awaits the pick, then delegates."""

    def __init__(
        self, multi: _AioMultiCallable, request: Any, timeout: float | None, kwargs: dict[str, Any]
    ) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._call: Any = None
        self._callbacks: list[DoneCallback] = []
        self._task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(
            self._start(multi, request, timeout, kwargs)
        )
        self._task.add_done_callback(self._started)

    @staticmethod
    async def _start(
        multi: _AioMultiCallable, request: Any, timeout: float | None, kwargs: dict[str, Any]
    ) -> Any:
        start = time.monotonic()
        try:
            ep = await multi._resolver.pick(multi._policy, timeout)
        except PickError as e:
            raise aio_error(e) from None
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - start))
        slot, mc = multi._entry(ep.address)
        try:
            call = mc(request, timeout=timeout, **kwargs)
        except BaseException:
            slot.release()
            raise
        call.add_done_callback(multi._done_callback(slot))
        wrap = multi._wrap
        return call if wrap is None else wrap(multi, slot, call, request, tuple(kwargs.values()))

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
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

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

    def _invoke(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        ep = self._resolver.pick_nowait(self._policy)
        if ep is None:
            kwargs = {
                "metadata": metadata,
                "credentials": credentials,
                "wait_for_ready": wait_for_ready,
                "compression": compression,
            }
            return self._deferred(self, request, timeout, kwargs)
        slot, mc = self._entry(ep.address)
        try:
            call = mc(
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
        wrap = self._wrap
        if wrap is None:
            return call
        return wrap(self, slot, call, request, (metadata, credentials, wait_for_ready, compression))


class _UnaryUnary(_AioMultiCallable, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    __slots__ = ()
    _deferred = _DeferredUnaryUnaryCall
    _wrap = AioUnaryUnaryCall

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
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression)


class _UnaryStream(_AioMultiCallable, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    __slots__ = ()
    _deferred = _DeferredUnaryStreamCall
    _wrap = AioUnaryStreamCall

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
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamUnary(_AioMultiCallable, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    __slots__ = ()
    _deferred = _DeferredStreamUnaryCall

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamStream(_AioMultiCallable, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    __slots__ = ()
    _deferred = _DeferredStreamStreamCall

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class Channel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` balancing every call over the pods of one Kubernetes Service.

    Build it with :func:`lookaside_grpc.aio.channel`; use it in the event loop that makes the calls.
    """

    def __init__(self, balancer: AioBalancer) -> None:
        self._balancer = balancer
        self._closed = False

    @property
    def target(self) -> str:
        """``service.namespace[:port]``."""
        return str(self._balancer.target)

    @property
    def mode(self) -> Mode:
        """``watch`` or ``per_call``."""
        return self._balancer.mode

    @property
    def policy(self) -> RoutingPolicy:
        """The routing policy picking backends."""
        return self._balancer.policy

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        """Release the balancer; the last user stops the watch task and closes every pooled channel (with
        ``grace``) and the lookaside channel."""
        if self._closed:
            return
        self._closed = True
        if _balancer.release(self._balancer):
            await self._balancer.aclose(grace)

    def stats(self) -> Stats:
        """Counters of this channel's balancer."""
        return self._balancer.stats()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """State of the lookaside channel (the per-backend channels come and go)."""
        return self._balancer.lookaside_channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._balancer.lookaside_channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        """Wait until the lookaside channel is READY."""
        await self._balancer.lookaside_channel.channel_ready()

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _UnaryUnary(
            self._balancer,
            "unary_unary",
            method,
            request_serializer,
            response_deserializer,
            bool(_registered_method),
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _UnaryStream(
            self._balancer,
            "unary_stream",
            method,
            request_serializer,
            response_deserializer,
            bool(_registered_method),
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _StreamUnary(
            self._balancer,
            "stream_unary",
            method,
            request_serializer,
            response_deserializer,
            bool(_registered_method),
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _StreamStream(
            self._balancer,
            "stream_stream",
            method,
            request_serializer,
            response_deserializer,
            bool(_registered_method),
        )


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
        loop = None  # no sharing outside a running loop
    settings: dict[str, Any] = dict(
        credentials=credentials,
        options=tuple(options),
        lookaside_credentials=lookaside_credentials,
        init_timeout=init_timeout,
        max_staleness=max_staleness,
        pick_cache_ttl=pick_cache_ttl,
        throttle=throttle,
    )
    if tls_server_name is not None:  # only when given: keeps the key shared with interceptors' balancers
        settings["tls_server_name"] = tls_server_name
    key = balancer_key("aio", target, mode, policy, loop=loop, **settings) if loop is not None else object()
    return Channel(_balancer.acquire(key, lambda: AioBalancer(target, mode=mode, policy=policy, **settings)))
