"""Call objects carrying the one transparent retry: a call that fails with UNAVAILABLE before any response
message (connection refused or reset: nothing reached the application) is sent once more to another endpoint
within the time left, and the failing address is ejected for a cool-down.

Shared by the channel factories and the interceptors. ``multi`` is the ``_MultiCallable`` of the method: it
knows the balancer, binds endpoints to pooled backend multicallables (``_entry``) and picks the retry
endpoint (``_next_attempt``). Nothing here runs on the success path but the wrapping itself: sync
``future()``/unary-stream calls and aio unary-unary/unary-stream calls are wrapped, blocking sync unary
calls retry inline (``_channel``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

import grpc
import grpc.aio

from lookaside_grpc._health import retryable
from lookaside_grpc._pool import Slot

# ------------------------------------------------------------------------------------------------- sync


def remaining(deadline: float | None) -> float | None:
    """Seconds left until the monotonic ``deadline`` (None = no deadline), never negative."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _SyncRetrying(grpc.Call, grpc.Future):  # type: ignore[misc]
    """What the sync wrappers share: the call's method, request, arguments and deadline; then the first
    attempt on ``slot``/``mc`` (``_attempt``)."""

    def __init__(
        self, multi: Any, slot: Slot[Any], mc: Any, request: Any, timeout: float | None, args: tuple[Any, ...]
    ) -> None:
        self._multi = multi
        self._request = request
        #: (metadata, credentials, wait_for_ready, compression) of the call, for the retry attempt
        self._args = args
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._init()
        self._attempt(slot, mc, timeout)

    def _init(self) -> None:
        """Per-shape state, set before the first attempt."""

    def _attempt(self, slot: Slot[Any], mc: Any, timeout: float | None) -> None:
        raise NotImplementedError


class UnaryUnaryFuture(_SyncRetrying):
    """A unary-unary call as ``future()`` returns it (Call + Future), retried once on another endpoint when
    it fails with UNAVAILABLE before any response byte."""

    def _init(self) -> None:
        self._retried = False
        self._cancelled = False
        self._finished = threading.Event()
        self._callbacks: list[Callable[[Any], None]] = []
        self._lock = threading.Lock()

    def _attempt(self, slot: Slot[Any], mc: Any, timeout: float | None) -> None:
        self._slot = slot
        self._t0 = time.monotonic()
        try:
            self._inner = mc.future(self._request, timeout, *self._args)
        except BaseException:
            slot.release()
            raise
        self._inner.add_done_callback(self._on_done)

    def _on_done(self, fut: Any) -> None:
        slot = self._slot
        slot.release()
        multi = self._multi
        if not self._retried and not self._cancelled and retryable(fut):
            self._retried = True
            nxt = multi._next_attempt(slot.address, self._deadline)
            if nxt is not None:
                try:
                    self._attempt(*nxt, remaining(self._deadline))
                    return
                except Exception:  # the first failure stands
                    pass
        else:
            if multi._observe is not None:
                multi._observe(slot.address, time.monotonic() - self._t0)
            if multi._probation and fut.code() is grpc.StatusCode.OK:
                multi._succeeded(slot.address)
        with self._lock:
            self._finished.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    def _final(self, timeout: float | None = None) -> Any:
        if not self._finished.wait(timeout):
            raise grpc.FutureTimeoutError()
        return self._inner

    # grpc.Future
    def cancel(self) -> bool:
        self._cancelled = True
        return self._inner.cancel()  # type: ignore[no-any-return]

    def cancelled(self) -> bool:
        return self._finished.is_set() and self._inner.cancelled()  # type: ignore[no-any-return]

    def running(self) -> bool:
        return not self._finished.is_set()

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> Any:
        return self._final(timeout).result()

    def exception(self, timeout: float | None = None) -> Any:
        return self._final(timeout).exception()

    def traceback(self, timeout: float | None = None) -> Any:
        return self._final(timeout).traceback()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._finished.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    # grpc.Call / RpcContext
    def initial_metadata(self) -> Any:
        return self._final().initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._final().trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._final().code()  # type: ignore[no-any-return]

    def details(self) -> str:
        return self._final().details()  # type: ignore[no-any-return]

    def debug_error_string(self) -> str:
        return self._final().debug_error_string()  # type: ignore[no-any-return]

    def is_active(self) -> bool:
        return not self._finished.is_set()

    def time_remaining(self) -> float | None:
        return remaining(self._deadline)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.add_done_callback(lambda _f: callback())
        return True


class UnaryStreamCall(_SyncRetrying):
    """A unary-stream call (response iterator + Call), retried once on another endpoint when it fails with
    UNAVAILABLE before the first response message. After the first message ``__next__`` only delegates."""

    def _init(self) -> None:
        self._first = True

    def _attempt(self, slot: Slot[Any], mc: Any, timeout: float | None) -> None:
        self._slot = slot
        self._inner = self._multi._track(slot, mc, self._request, timeout, *self._args)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if not self._first:
            return next(self._inner)
        try:
            response = next(self._inner)
        except grpc.RpcError as e:
            self._first = False
            if not retryable(e):
                raise
            retry = self._multi._retry_call(self._slot.address, self._deadline, self._request, self._args)
            if retry is None:
                raise
            self._slot, self._inner = retry
            return next(self._inner)
        except StopIteration:
            self._first = False
            raise
        self._first = False
        self._multi._succeeded(self._slot.address)
        return response

    def __getattr__(self, name: str) -> Any:
        # everything else of the rendezvous (Call, Future, RpcContext methods) is the current attempt's
        return getattr(self._inner, name)

    def initial_metadata(self) -> Any:
        return self._inner.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._inner.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._inner.code()  # type: ignore[no-any-return]

    def details(self) -> str:
        return self._inner.details()  # type: ignore[no-any-return]

    def is_active(self) -> bool:
        return self._inner.is_active()  # type: ignore[no-any-return]

    def time_remaining(self) -> float | None:
        return self._inner.time_remaining()  # type: ignore[no-any-return]

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._inner.add_callback(callback)  # type: ignore[no-any-return]

    def cancel(self) -> bool:
        return self._inner.cancel()  # type: ignore[no-any-return]

    def cancelled(self) -> bool:
        return self._inner.cancelled()  # type: ignore[no-any-return]

    def running(self) -> bool:
        return self._inner.running()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._inner.done()  # type: ignore[no-any-return]

    def result(self, timeout: float | None = None) -> Any:
        return self._inner.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        return self._inner.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        return self._inner.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._inner.add_done_callback(lambda _c: fn(self))


# -------------------------------------------------------------------------------------------------- aio


class _AioRetrying:
    """What the aio wrappers share: the current attempt, and starting the retry attempt."""

    def __init__(self, multi: Any, slot: Slot[Any], call: Any, request: Any, args: tuple[Any, ...]) -> None:
        self._multi = multi
        self._slot = slot
        self._call = call
        self._request = request
        #: (metadata, credentials, wait_for_ready, compression) of the call, for the retry attempt
        self._args = args
        self._retried = False

    def _retry(self, err: grpc.aio.AioRpcError) -> Any:
        """The retry attempt's call, or None (then ``err`` stands). The deadline is the first attempt's."""
        if self._retried or not retryable(err):
            return None
        self._retried = True
        left = self._call.time_remaining()
        deadline = None if left is None else time.monotonic() + left
        retry = self._multi._retry_call(self._slot.address, deadline, self._request, self._args)
        if retry is None:
            return None
        self._slot, self._call = retry
        return self._call

    def _succeeded(self) -> None:
        self._multi._succeeded(self._slot.address)

    # RpcContext / Call: the current attempt's
    def cancelled(self) -> bool:
        return self._call.cancelled()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._call.done()  # type: ignore[no-any-return]

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def cancel(self) -> bool:
        self._retried = True  # a cancelled call is never retried
        return self._call.cancel()  # type: ignore[no-any-return]

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        # registered on the current attempt (a retry happens only when the call is awaited / iterated)
        self._call.add_done_callback(lambda _c: callback(self))

    async def initial_metadata(self) -> Any:
        return await self._call.initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()  # type: ignore[no-any-return]

    async def details(self) -> str:
        return await self._call.details()  # type: ignore[no-any-return]

    async def wait_for_connection(self) -> None:
        await self._call.wait_for_connection()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} call={self._call!r} retried={self._retried}>"


class AioUnaryUnaryCall(_AioRetrying, grpc.aio.UnaryUnaryCall):  # type: ignore[misc]
    """grpc.aio unary-unary call with the one retry, done while it is awaited. The success path costs this
    object and one generator frame (``yield from`` the real call's ``__await__``)."""

    def __await__(self) -> Generator[Any, None, Any]:
        call = self._call
        try:
            response = yield from call.__await__()
        except grpc.aio.AioRpcError as e:
            if call is not self._call:  # awaited again after a retry
                return (yield from self._call.__await__())
            retry = self._retry(e)
            if retry is None:
                raise
            response = yield from retry.__await__()
        self._succeeded()
        return response


class AioUnaryStreamCall(_AioRetrying, grpc.aio.UnaryStreamCall):  # type: ignore[misc]
    """grpc.aio unary-stream call with the one retry before the first response message; after it, each
    ``__anext__``/``read`` hands out the real call's awaitable directly."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._it: Any = None
        self._started = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self  # type: ignore[return-value]

    def __anext__(self) -> Any:
        it = self._it
        if it is not None:
            return it.__anext__()
        return self._first_message()

    async def _first_message(self) -> Any:
        it = self._call.__aiter__()
        try:
            response = await it.__anext__()
        except grpc.aio.AioRpcError as e:
            retry = self._retry(e)
            if retry is None:
                self._it = it
                raise
            it = retry.__aiter__()
            self._it = it
            response = await it.__anext__()
        except StopAsyncIteration:
            self._it = it
            raise
        self._it = it
        self._succeeded()
        return response

    async def read(self) -> Any:
        if self._started:
            return await self._call.read()
        self._started = True
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as e:
            retry = self._retry(e)
            if retry is None:
                raise
            response = await retry.read()
        if response is not grpc.aio.EOF:
            self._succeeded()
        return response
