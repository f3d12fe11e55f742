"""``LookasideInterceptor``: lookaside balancing for a channel the application already has.

``grpc.intercept_channel(grpc.insecure_channel("greet:50051"), LookasideInterceptor(...))``: calls of the
routed gRPC services are sent over the shared per-backend channel pool (the same balancers as
``lookaside_grpc.channel``); everything else, and any call that cannot be routed, goes through the original
channel unchanged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from lookaside_grpc._balancer import DEFAULT_MAX_STALENESS, Balancer, Options
from lookaside_grpc._channel import _MultiCallable
from lookaside_grpc._errors import PickError
from lookaside_grpc._health import AdaptiveThrottle, retryable
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._pool import Slot
from lookaside_grpc._resolvers import WATCH, Mode
from lookaside_grpc._routing import DEFAULT_ROUTE_WAIT, Route, RouterCore, Target
from lookaside_grpc._stats import Stats


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
) -> tuple[Slot[Any], Any, float | None] | None:
    """Pick and count the call on a backend; None (fallback counted) if no endpoint can be had in time."""
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
    slot, mc = _multi(route, kind)._entry(ep.address)
    return slot, mc, timeout


class _Retrying:
    """Shared by the retrying unary-request wrappers: the one retry on another endpoint."""

    def _next_attempt(
        self, route: Route, kind: str, failed: str, deadline: float | None
    ) -> tuple[Slot[Any], Any, float | None] | None:
        balancer = route.balancer
        balancer.report_unavailable(failed)
        ep = balancer.repick(failed)
        timeout = None if deadline is None else deadline - time.monotonic()
        if ep is None or (timeout is not None and timeout <= 0):
            return None
        balancer.counters.retry()
        slot, mc = _multi(route, kind)._entry(ep.address)
        return slot, mc, timeout


class _UnaryUnaryCall(_Retrying, grpc.Call, grpc.Future):  # type: ignore[misc]
    """A unary-unary call as ``continuation`` would return it (Call + Future), retried once on another
    endpoint when it fails with UNAVAILABLE before any response byte."""

    def __init__(
        self, route: Route, slot: Slot[Any], mc: Any, request: Any, timeout: float | None, details: Any
    ) -> None:
        self._route = route
        self._request = request
        self._args = (details.metadata, details.credentials, details.wait_for_ready, details.compression)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._retried = False
        self._cancelled = False
        self._finished = threading.Event()
        self._callbacks: list[Callable[[Any], None]] = []
        self._lock = threading.Lock()
        self._attempt(slot, mc, timeout)

    def _attempt(self, slot: Slot[Any], mc: Any, timeout: float | None) -> None:
        self._slot = slot
        try:
            self._inner = mc.future(self._request, timeout, *self._args)
        except BaseException:
            slot.release()
            raise
        self._inner.add_done_callback(self._on_done)

    def _on_done(self, fut: Any) -> None:
        slot = self._slot
        slot.release()
        if not self._retried and not self._cancelled and retryable(fut):
            self._retried = True
            nxt = self._next_attempt(self._route, "unary_unary", slot.address, self._deadline)
            if nxt is not None:
                try:
                    self._attempt(*nxt)
                    return
                except Exception:  # the first failure stands
                    pass
        elif self._route.balancer.probation and fut.code() is grpc.StatusCode.OK:
            self._route.balancer.ejector.succeeded(slot.address)
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
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.add_done_callback(lambda _f: callback())
        return True


class _UnaryStreamCall(_Retrying, grpc.Call, grpc.Future):  # type: ignore[misc]
    """A unary-stream call (response iterator + Call), retried once on another endpoint when it fails with
    UNAVAILABLE before the first response message."""

    def __init__(
        self, route: Route, slot: Slot[Any], mc: Any, request: Any, timeout: float | None, details: Any
    ) -> None:
        self._route = route
        self._request = request
        self._args = (details.metadata, details.credentials, details.wait_for_ready, details.compression)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._first = True
        self._attempt(slot, mc, timeout)

    def _attempt(self, slot: Slot[Any], mc: Any, timeout: float | None) -> None:
        self._slot = slot
        try:
            self._inner = mc(self._request, timeout, *self._args)
        except BaseException:
            slot.release()
            raise
        self._inner.add_done_callback(slot.release)

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
            nxt = self._next_attempt(self._route, "unary_stream", self._slot.address, self._deadline)
            if nxt is None:
                raise
            self._attempt(*nxt)
            return next(self._inner)
        except StopIteration:
            self._first = False
            raise
        self._first = False
        if self._route.balancer.probation:
            self._route.balancer.ejector.succeeded(self._slot.address)
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


class LookasideInterceptor(
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
        self._core = RouterCore(
            "sync",
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
            balancer_factory=Balancer,
        )

    @property
    def routes(self) -> dict[str, Target]:
        """gRPC service name -> target."""
        return dict(self._core.routes)

    def stats(self) -> Stats:
        """Counters: the interceptor's own fallbacks plus those of the balancers it uses."""
        return self._core.stats()

    def close(self) -> None:
        """Release the balancers (the last user closes each: watch threads joined, pooled channels closed)."""
        for b in self._core.release_all():
            b.close()

    def __enter__(self) -> LookasideInterceptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        core = self._core
        route = core.route(client_call_details.method)
        if route is not None:
            started = _start(core, route, "unary_unary", client_call_details.timeout)
            if started is not None:
                slot, mc, timeout = started
                return _UnaryUnaryCall(route, slot, mc, request, timeout, client_call_details)
        return continuation(client_call_details, request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        core = self._core
        route = core.route(client_call_details.method)
        if route is not None:
            started = _start(core, route, "unary_stream", client_call_details.timeout)
            if started is not None:
                slot, mc, timeout = started
                return _UnaryStreamCall(route, slot, mc, request, timeout, client_call_details)
        return continuation(client_call_details, request)

    def _streaming_request(self, kind: str, continuation: Any, details: Any, request_iterator: Any) -> Any:
        core = self._core
        route = core.route(details.method)
        if route is not None:
            started = _start(core, route, kind, details.timeout)
            if started is not None:
                slot, mc, timeout = started
                args = (details.metadata, details.credentials, details.wait_for_ready, details.compression)
                try:
                    call = (mc.future if kind == "stream_unary" else mc)(request_iterator, timeout, *args)
                except BaseException:
                    slot.release()
                    raise
                call.add_done_callback(slot.release)
                return call
        return continuation(details, request_iterator)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._streaming_request("stream_unary", continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._streaming_request("stream_stream", continuation, client_call_details, request_iterator)
