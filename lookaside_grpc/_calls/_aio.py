"""grpc.aio calls of the four shapes. One call object per call: it starts on a picked endpoint at once, or
once an awaited pick arrives; a unary-request call fails over once to another endpoint when it gets
UNAVAILABLE before any response (retried while it is awaited / iterated); ``cancel()`` works at any point,
including while the pick is still pending (then ``cancelled()`` is True at once and ``code()`` CANCELLED).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Generic, TypeVar

import grpc
import grpc.aio

from lookaside_grpc import _compat
from lookaside_grpc._calls._engine import OK, Bound, CallArgs, Metadata, Method, Req, Resp, remaining
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._health import retryable
from lookaside_grpc._pool import Slot

M = TypeVar("M")
#: What starts a backend call: the bound multicallable (shape-specific) applied to request and options.
AioBackend = Callable[..., grpc.aio.Call]
AioMethod = Method[grpc.aio.Channel, AioBackend]
DoneCallback = Callable[[object], None]
_now = time.monotonic
#: grpc's text for a call cancelled by the application.
CANCELLED_DETAILS = "Locally cancelled by application!"
#: grpc core's status code numbers to ``grpc.StatusCode``.
_CODES: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}
_ending: set[asyncio.Task[None]] = set()


def _status_now(call: object, trailing: bool) -> tuple[grpc.StatusCode, Metadata | None] | None:
    """The status (and, if ``trailing``, the trailing metadata) of an ended grpc.aio call, read without
    awaiting from grpc's own call object (``call.code()`` is a coroutine); None for another call object (an
    intercepted or instrumented channel's)."""
    cython_call = getattr(call, "_cython_call", None)
    if cython_call is None:
        return None
    try:
        if not trailing and cython_call.is_ok():
            return OK, None
        status = cython_call._status
        code = _CODES.get(status.code(), grpc.StatusCode.UNKNOWN)
        return code, (tuple(status.trailing_metadata() or ()) if trailing else None)
    except Exception:  # grpc's private attributes changed: read it the public way
        return None


class _Ended:
    """The done callback of one backend attempt: ends it on the engine with the status grpc recorded (one
    small object per call, as the closure it replaces)."""

    __slots__ = ("_m", "_bound", "_t0")

    def __init__(self, m: AioMethod, bound: Bound[grpc.aio.Channel, AioBackend], t0: float) -> None:
        self._m = m
        self._bound = bound
        self._t0 = t0

    def __call__(self, call: grpc.aio.Call) -> None:
        m = self._m
        trailing = m.call_done is not None
        got = _status_now(call, trailing)
        if got is not None:
            m.ended(self._bound, self._t0, got[0], got[1])
        elif call.cancelled():
            m.ended(self._bound, self._t0, grpc.StatusCode.CANCELLED)
        else:  # not grpc's own call object: its status is a coroutine away (it is done: no wait)
            task = asyncio.get_running_loop().create_task(self._later(call, trailing))
            _ending.add(task)
            task.add_done_callback(_ending.discard)

    async def _later(self, call: grpc.aio.Call, trailing: bool) -> None:
        try:
            code = await call.code()
            metadata = tuple(await call.trailing_metadata() or ()) if trailing else None
        except Exception:
            code, metadata = grpc.StatusCode.UNKNOWN, None
        self._m.ended(self._bound, self._t0, code, metadata)


class AioCall(Generic[Req, Resp]):
    """What the four aio call shapes share: starting (now or after the pick), retry, cancel, status.

    Made on every call: slotted, and the hot path (a local pick, then awaiting a unary response) allocates
    nothing beyond this object and grpc's own call (no coroutine of ours, no closure)."""

    __slots__ = (
        "_m",
        "_request",
        "_deadline",
        "_args",
        "_retry",
        "_retried",
        "_call",
        "_slot",
        "_cancelled",
        "_callbacks",
        "_task",
        "_reading",
    )

    def __init__(
        self,
        m: AioMethod,
        request: object,
        deadline: float | None,
        args: CallArgs,
        retry: bool,
        start: Endpoint | Callable[[], Awaitable[Endpoint]],
    ) -> None:
        self._m = m
        self._request = request
        self._deadline = deadline
        self._args = args
        self._retry = retry
        self._retried = False
        self._call: grpc.aio.Call | None = None
        self._slot: Slot[grpc.aio.Channel] | None = None
        self._cancelled = False
        self._callbacks: tuple[DoneCallback, ...] = ()  # added before the backend call starts (rare)
        self._task: asyncio.Task[None] | None = None
        self._reading = False
        if isinstance(start, Endpoint):
            self._begin(m.enter(start.address))
        else:
            self._task = asyncio.get_running_loop().create_task(self._pick_then_begin(start))
            self._task.add_done_callback(self._pick_done)

    async def _pick_then_begin(self, pick: Callable[[], Awaitable[Endpoint]]) -> None:
        ep = await pick()
        self._begin(self._m.enter(ep.address))

    def _pick_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self._cancelled = True
        else:
            task.exception()  # retrieved: awaiting the call raises it
        if self._call is None:  # the pick failed or was cancelled: the call is over
            self._fire()

    def _fire(self) -> None:
        callbacks, self._callbacks = self._callbacks, ()
        for cb in callbacks:
            cb(self)

    def _begin(self, bound: Bound[grpc.aio.Channel, AioBackend]) -> None:
        m = self._m
        t0 = _now()
        a = self._args
        deadline = self._deadline
        try:
            call = bound.call(
                self._request,
                timeout=None if deadline is None else max(0.0, deadline - _now()),
                metadata=a.metadata,
                credentials=a.credentials,
                wait_for_ready=a.wait_for_ready,
                compression=a.compression,
            )
        except BaseException as e:
            code = e.code() if isinstance(e, grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
            m.ended(bound, t0, code)
            raise
        # ended when the backend call is done (awaited or not), with the status grpc recorded
        call.add_done_callback(_Ended(m, bound, t0))
        self._call, self._slot = call, bound.slot
        if self._callbacks:
            callbacks, self._callbacks = self._callbacks, ()
            for cb in callbacks:
                call.add_done_callback(self._relay(cb))

    def _relay(self, callback: DoneCallback) -> DoneCallback:
        """A done callback of the backend call that calls ``callback`` with this call."""

        def relay(_call: object) -> None:
            callback(self)

        return relay

    async def _started(self) -> grpc.aio.Call:
        """The current backend call, once started (raises the pick's failure, or CancelledError)."""
        call = self._call
        if call is not None:
            return call
        if self._cancelled:
            raise asyncio.CancelledError()
        task = self._task
        assert task is not None
        await task
        assert self._call is not None
        return self._call

    def _failover(self, err: grpc.aio.AioRpcError) -> grpc.aio.Call | None:
        """The retry attempt's call, or None (then ``err`` stands); the deadline is the first attempt's."""
        if self._retried or not self._retry or not retryable(err) or self._slot is None:
            return None
        self._retried = True
        nxt = self._m.retry_bound(self._slot.address, self._deadline, self._args.metadata)
        if nxt is None:
            return None
        self._begin(nxt)
        return self._call

    def _succeeded(self) -> None:
        m = self._m
        if m.balancer.probation and self._slot is not None:
            m.succeeded(self._slot.address)

    # RpcContext
    def cancelled(self) -> bool:
        if self._cancelled:
            return True
        return self._call.cancelled() if self._call is not None else False

    def done(self) -> bool:
        if self._call is not None:
            return self._call.done()
        return self._cancelled or (self._task is not None and self._task.done())

    def time_remaining(self) -> float | None:
        return remaining(self._deadline)

    def cancel(self) -> bool:
        call = self._call
        if call is not None:
            self._retried = True  # a cancelled call is never retried
            return call.cancel()
        task = self._task
        if self._cancelled or task is None or task.done():
            return False
        self._cancelled = True
        task.cancel()
        self._fire()
        return True

    def add_done_callback(self, callback: DoneCallback) -> None:
        call = self._call
        if call is not None:
            call.add_done_callback(lambda _c: callback(self))
        elif self.done():
            callback(self)
        else:
            self._callbacks += (callback,)

    # Call
    async def _settled(self) -> grpc.aio.Call | grpc.aio.AioRpcError | None:
        """The backend call, the pick's failure, or None when cancelled before it started."""
        if self._cancelled and self._call is None:
            return None
        try:
            return await self._started()
        except grpc.aio.AioRpcError as e:
            return e
        except asyncio.CancelledError:
            if self._cancelled:
                return None
            raise

    async def initial_metadata(self) -> grpc.aio.Metadata:
        got = await self._settled()
        if isinstance(got, grpc.aio.Call):
            return await got.initial_metadata()
        return grpc.aio.Metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        got = await self._settled()
        if isinstance(got, grpc.aio.Call):
            return await got.trailing_metadata()
        return grpc.aio.Metadata()

    async def code(self) -> grpc.StatusCode:
        got = await self._settled()
        if got is None:
            return grpc.StatusCode.CANCELLED
        if isinstance(got, grpc.aio.AioRpcError):
            return got.code()
        return await got.code()

    async def details(self) -> str:
        got = await self._settled()
        if got is None:
            return CANCELLED_DETAILS
        if isinstance(got, grpc.aio.AioRpcError):
            return got.details() or ""
        return await got.details()

    async def debug_error_string(self) -> str:
        got = await self._settled()
        if isinstance(got, grpc.aio.AioRpcError):
            return got.debug_error_string() or ""
        return ""

    async def wait_for_connection(self) -> None:
        await (await self._started()).wait_for_connection()

    # unary response
    def __await__(self) -> Generator[None, None, Resp]:
        """Await the response (a generator, not a coroutine of ours: one frame less per call)."""
        call = self._call
        if call is None:
            call = yield from self._started().__await__()
        try:
            response: Resp = yield from call.__await__()  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as e:
            retry = self._failover(e)
            if retry is None:
                raise
            response = yield from retry.__await__()  # type: ignore[attr-defined]
        self._succeeded()
        return response

    # streaming response
    def __aiter__(self) -> AsyncIterator[Resp]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Resp]:
        call = await self._started()
        it: AsyncIterator[Resp] = call.__aiter__()  # type: ignore[attr-defined]
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            return
        except grpc.aio.AioRpcError as e:
            retry = self._failover(e)
            if retry is None:
                raise
            it = retry.__aiter__()  # type: ignore[attr-defined]
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                return
        self._succeeded()
        yield first
        async for response in it:
            yield response

    async def read(self) -> object:
        call = await self._started()
        first = not self._reading
        self._reading = True
        try:
            response: object = await call.read()  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as e:
            retry = self._failover(e) if first else None
            if retry is None:
                raise
            response = await retry.read()  # type: ignore[attr-defined]
        if first and response is not grpc.aio.EOF:
            self._succeeded()
        return response

    # streaming request
    async def write(self, request: Req) -> None:
        await (await self._started()).write(request)  # type: ignore[attr-defined]

    async def done_writing(self) -> None:
        await (await self._started()).done_writing()  # type: ignore[attr-defined]

    @property
    def _done_writing_flag(self) -> bool:
        """grpc.aio's interceptor machinery reads this private flag of the call an interceptor returns."""
        return bool(getattr(self._call, "_done_writing_flag", False))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} call={self._call!r} cancelled={self._cancelled}>"


class UnaryUnaryCall(AioCall[Req, Resp], _compat.AioUnaryUnaryCall[Req, Resp]):
    """A balanced grpc.aio unary-unary call."""


class UnaryStreamCall(AioCall[Req, Resp], _compat.AioUnaryStreamCall[Req, Resp]):
    """A balanced grpc.aio unary-stream call."""


class StreamUnaryCall(AioCall[Req, Resp], _compat.AioStreamUnaryCall[Req, Resp]):
    """A balanced grpc.aio stream-unary call."""


class StreamStreamCall(AioCall[Req, Resp], _compat.AioStreamStreamCall[Req, Resp]):
    """A balanced grpc.aio stream-stream call."""


SHAPES: dict[str, tuple[type[AioCall[object, object]], bool]] = {
    "unary_unary": (UnaryUnaryCall, True),
    "unary_stream": (UnaryStreamCall, True),
    "stream_unary": (StreamUnaryCall, False),
    "stream_stream": (StreamStreamCall, False),
}


def start(
    shape: str,
    m: AioMethod,
    request: object,
    deadline: float | None,
    args: CallArgs,
    at: Endpoint | Callable[[], Awaitable[Endpoint]],
) -> AioCall[object, object]:
    """Start a call of ``shape`` on endpoint ``at`` (or once the awaited pick ``at()`` returns one)."""
    cls, retry = SHAPES[shape]
    return cls(m, request, deadline, args, retry, at)
