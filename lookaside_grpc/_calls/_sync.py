"""Sync calls of the four shapes, started on a picked endpoint, with the one transparent retry: a unary
request that fails with UNAVAILABLE before any response (connection refused or reset: nothing reached the
application) is sent once more to another endpoint within the time left, and the failing address is
ejected for a cool-down. Blocking unary calls retry inline; ``future()`` and response streams return call
objects that retry. Backend calls may be plain iterators (instrumented channels): nothing here needs more."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import grpc

from lookaside_grpc import _compat
from lookaside_grpc._calls._engine import (
    OK,
    Bound,
    CallArgs,
    Metadata,
    Method,
    Req,
    Resp,
    deadline_of,
    remaining,
)
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._errors import FailedCall, PickError
from lookaside_grpc._health import retryable

T = TypeVar("T")
M = TypeVar("M")
SyncMethod = Method[grpc.Channel, M]
UU = grpc.UnaryUnaryMultiCallable
US = grpc.UnaryStreamMultiCallable
SU = grpc.StreamUnaryMultiCallable
SS = grpc.StreamStreamMultiCallable
UNKNOWN = grpc.StatusCode.UNKNOWN
CANCELLED = grpc.StatusCode.CANCELLED


def code_of(call: object) -> grpc.StatusCode:
    """The status code of an ended call, future or ``grpc.RpcError`` (UNKNOWN when it has none)."""
    code = getattr(call, "code", None)
    if callable(code):
        try:
            got = code()
        except Exception:
            return UNKNOWN
        if isinstance(got, grpc.StatusCode):
            return got
    return UNKNOWN


def trailing_of(call: object) -> Metadata | None:
    """The trailing metadata of an ended call, future or ``grpc.RpcError`` (None when it has none)."""
    get = getattr(call, "trailing_metadata", None)
    if not callable(get):
        return None
    try:
        return tuple(get() or ())
    except Exception:
        return None


class _Once:
    """End a call exactly once, from whichever of done callback, end of iteration, cancel or GC comes
    first."""

    __slots__ = ("_method", "_bound", "_t0", "_done")

    def __init__(self, method: Method[grpc.Channel, M], bound: Bound[grpc.Channel, M], t0: float) -> None:
        self._method: Method[grpc.Channel, object] = method
        self._bound: Bound[grpc.Channel, object] = bound
        self._t0 = t0
        self._done = False

    def __call__(self, call: object = None) -> None:
        """As a done callback: ``call`` is the ended grpc call (none: dropped, i.e. cancelled)."""
        if self._done:
            return
        self._done = True
        m = self._method
        if call is None:
            m.ended(self._bound, self._t0, CANCELLED)
        else:
            m.ended(self._bound, self._t0, code_of(call), None if m.call_done is None else trailing_of(call))

    def end(self, code: grpc.StatusCode, trailing: Metadata | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._method.ended(self._bound, self._t0, code, trailing)


def _failed(m: SyncMethod[M], bound: Bound[grpc.Channel, M], t0: float, e: BaseException) -> None:
    """End the call on ``bound`` with the error it raised."""
    m.ended(bound, t0, code_of(e), None if m.call_done is None else trailing_of(e))


def _ok(m: SyncMethod[M], bound: Bound[grpc.Channel, M], t0: float, result: object, with_call: bool) -> None:
    """End the call on ``bound`` with OK (its trailing metadata from a ``with_call`` result, if wanted)."""
    trailing = None
    if with_call and m.call_done is not None:
        trailing = trailing_of(result[1])  # type: ignore[index]
    m.ended(bound, t0, OK, trailing)


def _blocking(
    m: SyncMethod[M],
    bound: Bound[grpc.Channel, M],
    deadline: float | None,
    invoke: Callable[[M, float | None], T],
    with_call: bool = False,
) -> T:
    """The retry attempt of a blocking call on ``bound`` (already counted); ``with_call``: ``invoke``
    returns ``(response, call)``."""
    t0 = m.clock()
    try:
        result = invoke(bound.call, remaining(deadline))
    except BaseException as e:
        _failed(m, bound, t0, e)
        raise
    _ok(m, bound, t0, result, with_call)
    m.succeeded(bound.slot.address)
    return result


def _retrying(
    m: SyncMethod[M],
    ep: Endpoint,
    deadline: float | None,
    invoke: Callable[[M, float | None], T],
    retry: bool,
    with_call: bool = False,
) -> T:
    """A blocking call with ``invoke(backend multicallable, timeout)``; retried once when allowed."""
    bound = m.enter(ep.address)
    t0 = m.clock()
    try:
        result = invoke(bound.call, remaining(deadline))
    except grpc.RpcError as e:
        _failed(m, bound, t0, e)
        if not (retry and retryable(e)):
            raise
        nxt = m.retry_bound(bound.slot.address, deadline)
        if nxt is None:
            raise
        return _blocking(m, nxt, deadline, invoke, with_call)
    except BaseException as e:
        _failed(m, bound, t0, e)
        raise
    _ok(m, bound, t0, result, with_call)
    m.succeeded(bound.slot.address)
    return result


def unary_unary(
    m: SyncMethod[UU[Req, Resp]],
    ep: Endpoint,
    request: Req,
    timeout: float | None,
    deadline: float | None,
    a: CallArgs,
) -> Resp:
    """Blocking unary-unary ``__call__``: the hot path, inline (``timeout``: what is left of the call's).
    Through ``with_call`` only when the policy wants the call's trailing metadata."""
    if m.call_done is not None:
        return unary_unary_with_call(m, ep, request, deadline, a)[0]
    bound = m.enter(ep.address)
    t0 = m.clock()
    try:
        result = bound.call(request, timeout, a.metadata, a.credentials, a.wait_for_ready, a.compression)
    except grpc.RpcError as e:
        m.ended(bound, t0, code_of(e))
        if not retryable(e):
            raise
        nxt = m.retry_bound(bound.slot.address, deadline, a.metadata)
        if nxt is None:
            raise
        return _blocking(
            m,
            nxt,
            deadline,
            lambda mc, left: mc(request, left, a.metadata, a.credentials, a.wait_for_ready, a.compression),
        )
    except BaseException as e:
        _failed(m, bound, t0, e)
        raise
    m.ended(bound, t0, OK)
    m.succeeded(bound.slot.address)
    return result


def unary_unary_with_call(
    m: SyncMethod[UU[Req, Resp]], ep: Endpoint, request: Req, deadline: float | None, a: CallArgs
) -> tuple[Resp, grpc.Call]:
    """Blocking unary-unary ``with_call`` (the sync interceptor's hot path: inline, as ``unary_unary``)."""
    bound = m.enter(ep.address)
    t0 = m.clock()
    try:
        result = bound.call.with_call(
            request, remaining(deadline), a.metadata, a.credentials, a.wait_for_ready, a.compression
        )
    except grpc.RpcError as e:
        _failed(m, bound, t0, e)
        if not retryable(e):
            raise
        nxt = m.retry_bound(bound.slot.address, deadline, a.metadata)
        if nxt is None:
            raise
        return _blocking(
            m,
            nxt,
            deadline,
            lambda mc, left: mc.with_call(
                request, left, a.metadata, a.credentials, a.wait_for_ready, a.compression
            ),
            with_call=True,
        )
    except BaseException as e:
        _failed(m, bound, t0, e)
        raise
    m.ended(bound, t0, OK, None if m.call_done is None else trailing_of(result[1]))
    m.succeeded(bound.slot.address)
    return result


def stream_unary(
    m: SyncMethod[SU[Req, Resp]], ep: Endpoint, requests: Iterator[Req], deadline: float | None, a: CallArgs
) -> Resp:
    """Blocking stream-unary ``__call__``: never retried (the request iterator is consumed)."""
    if m.call_done is not None:
        return stream_unary_with_call(m, ep, requests, deadline, a)[0]

    def invoke(mc: SU[Req, Resp], timeout: float | None) -> Resp:
        return mc(requests, timeout, a.metadata, a.credentials, a.wait_for_ready, a.compression)

    return _retrying(m, ep, deadline, invoke, retry=False)


def stream_unary_with_call(
    m: SyncMethod[SU[Req, Resp]], ep: Endpoint, requests: Iterator[Req], deadline: float | None, a: CallArgs
) -> tuple[Resp, grpc.Call]:
    """Blocking stream-unary ``with_call``."""

    def invoke(mc: SU[Req, Resp], timeout: float | None) -> tuple[Resp, grpc.Call]:
        return mc.with_call(requests, timeout, a.metadata, a.credentials, a.wait_for_ready, a.compression)

    return _retrying(m, ep, deadline, invoke, retry=False, with_call=True)


def _track(m: SyncMethod[M], bound: Bound[grpc.Channel, M], call: object, t0: float) -> _Once:
    """End ``call`` when it is done (its done callback, if it has one)."""
    once = _Once(m, bound, t0)
    add = getattr(call, "add_done_callback", None)
    if callable(add):
        add(once)
    return once


def stream_unary_future(
    m: SyncMethod[SU[Req, Resp]], ep: Endpoint, requests: Iterator[Req], deadline: float | None, a: CallArgs
) -> _compat.CallFuture[Resp]:
    """Stream-unary ``future()``: grpc's own future, ended when done (no retry)."""
    bound = m.enter(ep.address)
    t0 = m.clock()
    try:
        fut = bound.call.future(
            requests,
            remaining(deadline),
            a.metadata,
            a.credentials,
            a.wait_for_ready,
            a.compression,
        )
    except BaseException as e:
        _failed(m, bound, t0, e)
        raise
    if not callable(getattr(fut, "add_done_callback", None)):
        m.ended(bound, t0, OK)  # an instrumented channel's future: its end cannot be seen, counted now
        return fut
    _track(m, bound, fut, t0)
    return fut


class UnaryUnaryFuture(_compat.CallFuture[Resp], Generic[Req, Resp]):
    """A unary-unary call as ``future()`` returns it (Call + Future), retried once on another endpoint when
    it fails with UNAVAILABLE before any response byte."""

    def __init__(
        self, m: SyncMethod[UU[Req, Resp]], ep: Endpoint, request: Req, deadline: float | None, a: CallArgs
    ) -> None:
        self._m = m
        self._request = request
        self._args = a
        self._deadline = deadline
        self._retried = False
        self._cancelled = False
        self._finished = threading.Event()
        self._callbacks: list[Callable[[grpc.Future[Resp]], None]] = []
        self._lock = threading.Lock()
        self._attempt(m.enter(ep.address))

    def _attempt(self, bound: Bound[grpc.Channel, UU[Req, Resp]]) -> None:
        self._bound = bound
        self._t0 = self._m.clock()
        a = self._args
        try:
            self._inner: grpc.Future[Resp] = bound.call.future(
                self._request,
                remaining(self._deadline),
                a.metadata,
                a.credentials,
                a.wait_for_ready,
                a.compression,
            )
        except BaseException as e:
            _failed(self._m, bound, self._t0, e)
            raise
        self._inner.add_done_callback(self._on_done)

    def _on_done(self, fut: grpc.Future[Resp]) -> None:
        m = self._m
        slot = self._bound.slot
        m.ended(self._bound, self._t0, code_of(fut), None if m.call_done is None else trailing_of(fut))
        if not self._retried and not self._cancelled and retryable(fut):
            self._retried = True
            nxt = m.retry_bound(slot.address, self._deadline, self._args.metadata)
            if nxt is not None:
                try:
                    self._attempt(nxt)
                    return
                except Exception:  # the first failure stands
                    pass
        elif isinstance(fut, grpc.Call) and fut.code() is grpc.StatusCode.OK:
            m.succeeded(slot.address)
        with self._lock:
            self._finished.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    def _final(self, timeout: float | None = None) -> grpc.Future[Resp]:
        if not self._finished.wait(timeout):
            raise grpc.FutureTimeoutError()
        return self._inner

    def _call(self) -> grpc.Call:
        inner = self._final()
        assert isinstance(inner, grpc.Call)
        return inner

    # grpc.Future
    def cancel(self) -> bool:
        self._cancelled = True
        return self._inner.cancel()

    def cancelled(self) -> bool:
        return self._finished.is_set() and self._inner.cancelled()

    def running(self) -> bool:
        return not self._finished.is_set()

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> Resp:
        return self._final(timeout).result()

    def exception(self, timeout: float | None = None) -> Exception | None:
        return self._final(timeout).exception()

    def traceback(self, timeout: float | None = None) -> object:
        return self._final(timeout).traceback()

    def add_done_callback(self, fn: Callable[[grpc.Future[Resp]], None]) -> None:
        with self._lock:
            if not self._finished.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    # grpc.Call / RpcContext
    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._call().initial_metadata()

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._call().trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._call().code()

    def details(self) -> str:
        return self._call().details()

    def debug_error_string(self) -> str:
        return str(getattr(self._final(), "debug_error_string", lambda: "")())

    def is_active(self) -> bool:
        return not self._finished.is_set()

    def time_remaining(self) -> float:
        left = remaining(self._deadline)
        return float("inf") if left is None else left

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.add_done_callback(lambda _f: callback())
        return True


class ResponseStream(_compat.CallFuture[Resp], _compat.CallIterator[Resp], Generic[Req, Resp]):
    """A response-streaming call (iterator + Call + Future). A unary-request call is retried once on another
    endpoint when it fails with UNAVAILABLE before the first response message (``retry`` set). The backend
    call may be grpc's own or a plain iterator (an instrumented channel's): this object works for both and
    uncounts the call at its end, on cancel, or when it is garbage collected."""

    def __init__(
        self,
        m: SyncMethod[Callable[..., Iterator[Resp]]],
        ep: Endpoint,
        request: object,
        deadline: float | None,
        a: CallArgs,
        retry: bool,
    ) -> None:
        self._m = m
        self._request = request
        self._args = a
        self._deadline = deadline
        self._first = True
        self._retry = retry
        self._error: grpc.RpcError | None = None
        self._ended = False
        self._attempt(m.enter(ep.address))

    def _attempt(self, bound: Bound[grpc.Channel, Callable[..., Iterator[Resp]]]) -> None:
        self._slot = bound.slot
        t0 = self._m.clock()
        a = self._args
        try:
            self._inner: Iterator[Resp] = bound.call(
                self._request,
                remaining(self._deadline),
                a.metadata,
                a.credentials,
                a.wait_for_ready,
                a.compression,
            )
        except BaseException as e:
            _failed(self._m, bound, t0, e)
            raise
        self._release = _track(self._m, bound, self._inner, t0)
        self._finalizer = weakref.finalize(self, self._release)

    def __iter__(self) -> ResponseStream[Req, Resp]:
        return self

    def __next__(self) -> Resp:
        if not self._first:
            return self._next()
        self._first = False
        try:
            response = self._next()
        except grpc.RpcError as e:
            if not (self._retry and retryable(e)):
                raise
            nxt = self._m.retry_bound(self._slot.address, self._deadline, self._args.metadata)
            if nxt is None:
                raise
            self._error = None
            self._attempt(nxt)
            return self._next()
        self._m.succeeded(self._slot.address)
        return response

    def _next(self) -> Resp:
        try:
            return next(self._inner)
        except StopIteration:
            self._ended = True
            wanted = self._m.call_done is not None
            self._release.end(OK, trailing_of(self._inner) if wanted else None)
            raise
        except grpc.RpcError as e:
            self._error = e
            self._ended = True
            self._release.end(code_of(e), trailing_of(e) if self._m.call_done is not None else None)
            raise

    def _grpc_call(self) -> grpc.Call | None:
        inner = self._inner
        return inner if isinstance(inner, grpc.Call) else None

    def _future(self) -> grpc.Future[Resp] | None:
        inner = self._inner
        return inner if isinstance(inner, grpc.Future) else None

    # grpc.Call
    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        call = self._grpc_call()
        return call.initial_metadata() if call is not None else ()

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        call = self._grpc_call()
        if call is not None:
            return call.trailing_metadata()
        return tuple(self._error.trailing_metadata() or ()) if isinstance(self._error, grpc.Call) else ()

    def code(self) -> grpc.StatusCode:
        call = self._grpc_call()
        if call is not None:
            return call.code()
        if isinstance(self._error, grpc.Call):
            return self._error.code()
        return grpc.StatusCode.OK if self._ended else grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        call = self._grpc_call()
        if call is not None:
            return call.details()
        return self._error.details() if isinstance(self._error, grpc.Call) else ""

    def is_active(self) -> bool:
        call = self._grpc_call()
        return call.is_active() if call is not None else not self._ended

    def time_remaining(self) -> float:
        left = remaining(self._deadline)
        return float("inf") if left is None else left

    def add_callback(self, callback: Callable[[], None]) -> bool:
        call = self._grpc_call()
        return call.add_callback(callback) if call is not None else False

    def cancel(self) -> bool:
        inner = self._inner
        cancel = getattr(inner, "cancel", None)
        if callable(cancel):
            result = bool(cancel())
        else:  # a plain generator: closing it drops (and so cancels) the call under it
            close = getattr(inner, "close", None)
            if callable(close):
                close()
            result = True
        self._release.end(CANCELLED)
        return result

    # grpc.Future
    def cancelled(self) -> bool:
        fut = self._future()
        return fut.cancelled() if fut is not None else False

    def running(self) -> bool:
        fut = self._future()
        return fut.running() if fut is not None else not self._ended

    def done(self) -> bool:
        fut = self._future()
        return fut.done() if fut is not None else self._ended

    def result(self, timeout: float | None = None) -> Resp:
        fut = self._future()
        if fut is None:
            raise NotImplementedError("result() of a response stream")
        return fut.result(timeout)

    def exception(self, timeout: float | None = None) -> Exception | None:
        fut = self._future()
        return fut.exception(timeout) if fut is not None else self._error

    def traceback(self, timeout: float | None = None) -> object:
        fut = self._future()
        return fut.traceback(timeout) if fut is not None else None

    def add_done_callback(self, fn: Callable[[grpc.Future[Resp]], None]) -> None:
        fut = self._future()
        if fut is not None:
            fut.add_done_callback(lambda _f: fn(self))
        elif self._ended:
            fn(self)

    def debug_error_string(self) -> str:
        return str(getattr(self._inner, "debug_error_string", lambda: "")())


def unary_stream(
    m: SyncMethod[US[Req, Resp]], ep: Endpoint, request: Req, deadline: float | None, a: CallArgs
) -> ResponseStream[Req, Resp]:
    """Unary-stream call, retried before its first response message."""
    return ResponseStream(m, ep, request, deadline, a, retry=True)


def stream_stream(
    m: SyncMethod[SS[Req, Resp]], ep: Endpoint, requests: Iterator[Req], deadline: float | None, a: CallArgs
) -> ResponseStream[Req, Resp]:
    """Stream-stream call: never retried (the request iterator is consumed)."""
    return ResponseStream(m, ep, requests, deadline, a, retry=False)


class DeferredCall(_compat.CallFuture[object], _compat.CallIterator[object]):
    """A non-blocking call (``future()`` or a response stream) whose pick must wait (cold start): it is
    returned at once, as grpc returns its calls, while a thread waits for the pick and starts the real call;
    every method waits for that call (a failed pick becomes a failed call) and delegates to it."""

    def __init__(self, make: Callable[[], object]) -> None:
        self._ready = threading.Event()
        self._call: object = None
        self._cancelled = False
        threading.Thread(target=self._start, args=(make,), name="lookaside-pick", daemon=True).start()

    def _start(self, make: Callable[[], object]) -> None:
        try:
            call = make()
        except PickError as e:
            call = FailedCall(e)
        except grpc.RpcError as e:  # raised by the backend multicallable itself
            call = e
        except BaseException as e:  # anything else (e.g. a closed pool): fail the call with it
            call = FailedCall(PickError(grpc.StatusCode.UNAVAILABLE, f"could not start the call: {e!r}"))
        self._call = call
        self._ready.set()
        if self._cancelled:
            cancel = getattr(call, "cancel", None)
            if callable(cancel):
                cancel()

    def _get(self, timeout: float | None = None) -> object:
        if not self._ready.wait(timeout):
            raise grpc.FutureTimeoutError()
        return self._call

    def _do(self, name: str, *args: object) -> object:
        return getattr(self._get(), name)(*args)

    # iterator
    def __iter__(self) -> DeferredCall:
        return self

    def __next__(self) -> object:
        return next(self._get())  # type: ignore[call-overload]

    # grpc.Future
    def cancel(self) -> bool:
        if not self._ready.is_set():
            self._cancelled = True
            return True
        return bool(self._do("cancel"))

    def cancelled(self) -> bool:
        if not self._ready.is_set():
            return self._cancelled
        return bool(self._do("cancelled"))

    def running(self) -> bool:
        return not self._ready.is_set() or bool(self._do("running"))

    def done(self) -> bool:
        return self._ready.is_set() and bool(self._do("done"))

    def result(self, timeout: float | None = None) -> object:
        deadline = deadline_of(timeout)
        return self._do_timed("result", deadline)

    def exception(self, timeout: float | None = None) -> Exception | None:
        got = self._do_timed("exception", deadline_of(timeout))
        return got if isinstance(got, Exception) else None

    def traceback(self, timeout: float | None = None) -> object:
        return self._do_timed("traceback", deadline_of(timeout))

    def _do_timed(self, name: str, deadline: float | None) -> object:
        call = self._get(remaining(deadline))
        return getattr(call, name)(remaining(deadline))

    def add_done_callback(self, fn: Callable[[grpc.Future[object]], None]) -> None:
        def later() -> None:
            self._ready.wait()
            add = getattr(self._call, "add_done_callback", None)
            if callable(add):
                add(lambda _c: fn(self))
            else:
                fn(self)

        if self._ready.is_set():
            later()
        else:
            threading.Thread(target=later, name="lookaside-callback", daemon=True).start()

    # grpc.Call
    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._do("initial_metadata")  # type: ignore[return-value]

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._do("trailing_metadata")  # type: ignore[return-value]

    def code(self) -> grpc.StatusCode:
        return self._do("code")  # type: ignore[return-value]

    def details(self) -> str:
        return self._do("details")  # type: ignore[return-value]

    def debug_error_string(self) -> str:
        return str(self._do("debug_error_string"))

    def is_active(self) -> bool:
        return not self._ready.is_set() or bool(self._do("is_active"))

    def time_remaining(self) -> float:
        return self._do("time_remaining")  # type: ignore[return-value]

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return bool(self._do("add_callback", callback))
