"""The server interceptor every RPC passes: log context, client identity rule, stream slots and metrics.

It wraps each known method's handler (unknown methods are left to grpc's UNIMPLEMENTED and not counted, so
metric labels stay bounded), so the checks live in one place instead of in every servicer method:

1. binds the peer to the log context (:mod:`lookaside_server._web.logging`) and routes limit hits to the
   server's metrics;
2. the identity rule of the :class:`~lookaside_server._security.access.AccessPolicy` (PERMISSION_DENIED);
3. for the long-lived streams (``Watch``, xDS ``StreamAggregatedResources``) a slot of the
   :class:`~lookaside_server._security.limits.StreamSlots` (RESOURCE_EXHAUSTED when the overall or per-peer
   limit is reached), released when the stream ends;
4. counts the RPC in the server's metrics (:class:`~lookaside_server._web.metrics.MethodMetrics`): started
   when its behaviour starts, handled with its final status code and duration when it ends (a stream when
   it ends), and the messages it received and sent (counted around the request iterator, ``context.read``,
   ``context.write`` and the response generator).

It also parses unary requests tolerantly: a body that is not a valid message gets INVALID_ARGUMENT from here
(grpc.aio alone would answer UNKNOWN "Unexpected DecodeError").
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from lookaside_server._core.errors import abort
from lookaside_server._security.access import AccessPolicy
from lookaside_server._security.limits import StreamSlots, exhausted, peer_ip, set_recorder
from lookaside_server._web.logging import bind_peer
from lookaside_server._web.metrics import GRPC_TYPES, MethodMetrics, ServerMetrics

log = logging.getLogger(__name__)

#: Long-lived streams that take a slot, and their kind (metric label).
STREAM_KINDS = {
    "/lookaside.Lookaside/Watch": "watch",
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources": "xds",
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources": "xds",
}


class _Malformed:
    """Stands in for a request body that did not parse, so the handler answers INVALID_ARGUMENT."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer`` that returns a :class:`_Malformed` instead of raising on a bad body."""

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and anything a parser may raise
            return _Malformed(f"{type(e).__name__}: {e}")

    return parse


class _CountingIterator:
    """A request iterator that counts each message received."""

    __slots__ = ("_it", "_m")

    def __init__(self, it: AsyncIterator[Any], m: MethodMetrics) -> None:
        self._it = aiter(it)
        self._m = m

    def __aiter__(self) -> _CountingIterator:
        return self

    async def __anext__(self) -> Any:
        message = await anext(self._it)
        self._m.received.inc()
        return message


class _CountingContext:
    """The servicer context of a streaming RPC, counting what ``read`` and ``write`` pass; everything else is
    the real context's."""

    __slots__ = ("_context", "_m")

    def __init__(self, context: grpc.aio.ServicerContext, m: MethodMetrics) -> None:
        self._context = context
        self._m = m

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._m.received.inc()
        return message

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._m.sent.inc()


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c.name
    return "UNKNOWN"


def _final_code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    """The status the RPC ends with: what the handler set/aborted with, else from the exception."""
    try:
        code = context.code()
    except Exception:  # noqa: BLE001
        code = None
    if code is not None:
        return _code_name(code)
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"


class ServerGuard(grpc.aio.ServerInterceptor):
    """See the module docstring."""

    def __init__(
        self, access: AccessPolicy, slots: StreamSlots, metrics: ServerMetrics | None = None
    ) -> None:
        self.access = access
        self.slots = slots
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        service, name = _split(method)
        kind = STREAM_KINDS.get(method)
        for attr in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            inner = getattr(handler, attr, None)
            if inner is None:
                continue
            m = self.metrics.method(GRPC_TYPES[attr], service, name) if self.metrics is not None else None
            if inspect.iscoroutinefunction(inner):
                wrapped: Any = self._wrap_coroutine(inner, service, name, kind, attr, m)
            elif inspect.isasyncgenfunction(inner):
                wrapped = self._wrap_generator(inner, service, name, kind, attr, m)
            else:
                return handler  # a sync handler: served as is
            changes: dict[str, Any] = {attr: wrapped}
            if attr.startswith("unary_") and handler.request_deserializer is not None:
                changes["request_deserializer"] = _tolerant(handler.request_deserializer)
            return handler._replace(**changes)
        return handler

    # --- the checks --------------------------------------------------------------------------------------

    async def _enter(
        self, request: Any, context: grpc.aio.ServicerContext, service: str, name: str, kind: str | None
    ) -> str | None:
        """Bind the log context, apply the identity rule, reject a malformed body and take a stream slot;
        return the slot's peer."""
        peer = context.peer()
        bind_peer(peer)
        set_recorder(self.metrics.limit_hit if self.metrics is not None else None)
        denial = self.access.identity_denial(context, service)
        if denial is not None:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, denial.message)
        if type(request) is _Malformed:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{service}/{name}: the request is not a valid message ({request.error})",
            )
        if kind is None:
            return None
        ip = peer_ip(peer)
        refused = self.slots.acquire(ip, kind)
        if refused is not None:
            await exhausted(context, *refused)
        return ip

    @staticmethod
    def _done(
        m: MethodMetrics | None, context: grpc.aio.ServicerContext, exc: BaseException | None, started: float
    ) -> str:
        """Count the RPC's end; return its final code (Python's name)."""
        code = _final_code(context, exc)
        if m is not None:
            try:
                m.handled(code, time.perf_counter() - started)
            except Exception:  # noqa: BLE001
                log.exception("counting an RPC failed")
        return code

    # --- wrappers ----------------------------------------------------------------------------------------

    def _wrap_coroutine(
        self,
        inner: Callable[..., Awaitable[Any]],
        service: str,
        name: str,
        kind: str | None,
        attr: str,
        m: MethodMetrics | None,
    ) -> Callable[..., Awaitable[Any]]:
        request_streaming = attr.startswith("stream_")
        unary_response = attr.endswith("_unary")

        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            exc: BaseException | None = None
            ip: str | None = None
            inner_context: Any = context
            if m is not None:
                m.started.inc()
                if request_streaming:
                    request = _CountingIterator(request, m)
                else:
                    m.received.inc()
                if request_streaming or not unary_response:
                    inner_context = _CountingContext(context, m)
            try:
                ip = await self._enter(request, context, service, name, kind)
                return await inner(request, inner_context)
            except BaseException as e:
                exc = e
                raise
            finally:
                if ip is not None and kind is not None:
                    self.slots.release(ip, kind)
                code = self._done(m, context, exc, started)
                if m is not None and unary_response and exc is None and code == "OK":
                    m.sent.inc()

        return behaviour

    def _wrap_generator(
        self,
        inner: Callable[..., AsyncIterator[Any]],
        service: str,
        name: str,
        kind: str | None,
        attr: str,
        m: MethodMetrics | None,
    ) -> Callable[..., AsyncIterator[Any]]:
        request_streaming = attr.startswith("stream_")

        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            exc: BaseException | None = None
            ip: str | None = None
            inner_context: Any = context
            if m is not None:
                m.started.inc()
                if request_streaming:
                    request = _CountingIterator(request, m)
                    inner_context = _CountingContext(context, m)
                else:
                    m.received.inc()
            try:
                ip = await self._enter(request, context, service, name, kind)
                async for response in inner(request, inner_context):
                    yield response
                    if m is not None:
                        m.sent.inc()
            except BaseException as e:
                exc = e
                raise
            finally:
                if ip is not None and kind is not None:
                    self.slots.release(ip, kind)
                self._done(m, context, exc, started)

        return behaviour
