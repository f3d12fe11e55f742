"""ORCA (Open Request Cost Aggregation) for backends: load reports in each call's trailing metadata.

A backend serving gRPC with :class:`OrcaServerInterceptor` (sync ``grpc.server``) or
:class:`AioOrcaServerInterceptor` (``grpc.aio.server``) attaches to every call's trailers an
``xds.data.orca.v3.OrcaLoadReport`` (``proto/xds/data/orca/v3/orca_load_report.proto``, a copy of cncf/xds',
wire-identical) under ``endpoint-load-metrics-bin``, as gRPC's own backends do (gRFC A51): what the
application reports through a :class:`ServerMetricRecorder` (server-wide: utilization, QPS, EPS, named
utilizations), overridden per call by what the handler records through :func:`call_recorder` (as gRPC C++'s
``ServerMetricRecorder`` / ``CallMetricRecorder``). grpc-go, grpc-java and C-core clients with
``weighted_round_robin``, and Envoy, read that trailer.

grpcio's own client (C-core) consumes ``endpoint-load-metrics-bin`` itself and never hands it to the
application (measured with grpcio 1.65 and 1.85), so the interceptor also sends the same bytes under
:data:`MIRROR_TRAILER` (``mirror=False`` turns that off): that is what lookaside_grpc's
``weighted_round_robin`` policy reads (:func:`load_report_of` takes either).

The messages live in a descriptor pool of the client's own (:data:`POOL`), so a process that also imports
xds-protos (the lookaside server does) holds both without a "duplicate symbol" clash.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf import descriptor_pool as _descriptor_pool

from lookaside_grpc._generated import orca_load_report_pb2 as _pb2
from lookaside_grpc._generated.orca_load_report_pb2 import OrcaLoadReport

log = logging.getLogger(__name__)

#: The trailer gRPC backends report load in (gRFC A51): a serialized :class:`OrcaLoadReport`.
TRAILER = "endpoint-load-metrics-bin"
#: The same bytes under a key grpcio's client hands to the application (it keeps :data:`TRAILER` to itself).
MIRROR_TRAILER = "lookaside-orca-bin"
#: The file descriptor of ``xds/data/orca/v3/orca_load_report.proto`` and its (private) descriptor pool.
DESCRIPTOR = _pb2.DESCRIPTOR
POOL: _descriptor_pool.DescriptorPool = _pb2.POOL
#: Seconds over which the interceptor measures the QPS and EPS it reports when the application sets none.
RATE_WINDOW = 1.0

_KEYS = frozenset({TRAILER, MIRROR_TRAILER})


def _valid(value: float) -> bool:
    """A metric value gRPC accepts: finite and not negative (others are ignored, as gRPC C++ does)."""
    return value >= 0.0 and math.isfinite(value)


class _Values:
    """The metric values of one recorder (server-wide or one call); unset = ``None`` / absent."""

    __slots__ = ("cpu", "mem", "app", "qps", "eps", "utilization", "request_cost", "named")

    def __init__(self) -> None:
        self.cpu: float | None = None
        self.mem: float | None = None
        self.app: float | None = None
        self.qps: float | None = None
        self.eps: float | None = None
        self.utilization: dict[str, float] = {}
        self.request_cost: dict[str, float] = {}
        self.named: dict[str, float] = {}

    def empty(self) -> bool:
        return (
            self.cpu is None
            and self.mem is None
            and self.app is None
            and self.qps is None
            and self.eps is None
            and not self.utilization
            and not self.request_cost
            and not self.named
        )

    def fill(self, report: OrcaLoadReport) -> None:
        """Write the values that are set into ``report`` (over what it holds)."""
        if self.cpu is not None:
            report.cpu_utilization = self.cpu
        if self.mem is not None:
            report.mem_utilization = self.mem
        if self.app is not None:
            report.application_utilization = self.app
        if self.qps is not None:
            report.rps_fractional = self.qps
        if self.eps is not None:
            report.eps = self.eps
        for mine, theirs in (
            (self.utilization, report.utilization),
            (self.request_cost, report.request_cost),
            (self.named, report.named_metrics),
        ):
            for k, v in mine.items():
                theirs[k] = v


class ServerMetricRecorder:
    """Server-wide load, set by the application whenever it knows better (a CPU sampler, a queue length):
    every call's report carries it. Thread-safe. Unless set, the QPS and EPS reported are those the
    interceptor measures itself over the last :data:`RATE_WINDOW` seconds (``measure_rates=False``: none).
    Values must be finite and not negative (utilizations are fractions, may exceed 1.0); others are
    ignored, as gRPC C++ does. ``None`` clears a value."""

    def __init__(self, *, measure_rates: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._values = _Values()
        self._version = 0
        self.measure_rates = measure_rates
        self._clock = clock
        self._calls = itertools.count()
        self._errors = itertools.count()
        self._count_call = self._calls.__next__
        self._count_error = self._errors.__next__
        self._window_start = clock()
        self._window_counts = (0, 0)
        self._rates = (0.0, 0.0)
        self._epoch = 0
        self._cached: tuple[int, int, bytes] = (-1, -1, b"")

    def _set(self, name: str, value: float | None) -> None:
        if value is not None and not _valid(value):
            log.debug("ORCA: ignoring %s=%r (must be finite and >= 0)", name, value)
            return
        with self._lock:
            setattr(self._values, name, None if value is None else float(value))
            self._version += 1

    def set_cpu_utilization(self, value: float | None) -> None:
        """CPU utilization, a fraction of the CPU available to this server."""
        self._set("cpu", value)

    def set_memory_utilization(self, value: float | None) -> None:
        """Memory utilization, a fraction of the memory available (0 to 1)."""
        self._set("mem", value)

    def set_application_utilization(self, value: float | None) -> None:
        """The application's own utilization (e.g. the max of CPU and memory): ``weighted_round_robin``
        prefers it to CPU utilization when set."""
        self._set("app", value)

    def set_qps(self, value: float | None) -> None:
        """Queries per second this server serves (all its services); replaces the measured rate."""
        self._set("qps", value)

    def set_eps(self, value: float | None) -> None:
        """Errors per second (calls ending with a non-OK status); replaces the measured rate."""
        self._set("eps", value)

    def set_named_utilization(self, name: str, value: float | None) -> None:
        """A named utilization (``utilization`` map), a fraction."""
        if value is not None and not _valid(value):
            return
        with self._lock:
            if value is None:
                self._values.utilization.pop(name, None)
            else:
                self._values.utilization[name] = float(value)
            self._version += 1

    def clear(self) -> None:
        """Forget every value set (the measured rates stay)."""
        with self._lock:
            self._values = _Values()
            self._version += 1

    # -- measured rates --------------------------------------------------------------------------------

    def count(self, ok: bool) -> None:
        """One call ended (``ok``: with status OK); lock-free. The interceptor calls this."""
        self._count_call()
        if not ok:
            self._count_error()

    def measured_rates(self) -> tuple[float, float]:
        """(QPS, EPS) over the last complete window of :data:`RATE_WINDOW` seconds."""
        now = self._clock()
        if now - self._window_start >= RATE_WINDOW:
            with self._lock:
                elapsed = now - self._window_start
                if elapsed >= RATE_WINDOW:
                    calls = int(repr(self._calls)[6:-1])
                    errors = int(repr(self._errors)[6:-1])
                    c0, e0 = self._window_counts
                    self._rates = ((calls - c0) / elapsed, (errors - e0) / elapsed)
                    self._window_counts = (calls, errors)
                    self._window_start = now
                    self._epoch += 1
        return self._rates

    # -- reports ---------------------------------------------------------------------------------------

    def report(self) -> OrcaLoadReport:
        """The server-wide report now (measured rates filling in an unset QPS / EPS)."""
        report = OrcaLoadReport()
        if self.measure_rates:
            qps, eps = self.measured_rates()
            if qps:
                report.rps_fractional = qps
            if eps:
                report.eps = eps
        with self._lock:
            self._values.fill(report)
        return report

    def serialized(self) -> bytes:
        """:meth:`report` serialized, cached until a value or the measured window changes (so the
        interceptor serializes about once a second, not once per call)."""
        if self.measure_rates:
            self.measured_rates()
        version, epoch, data = self._cached
        if version == self._version and epoch == self._epoch:
            return data
        version, epoch = self._version, self._epoch
        data = self.report().SerializeToString()
        self._cached = (version, epoch, data)
        return data


class CallMetricRecorder:
    """What one call reports on top of the server-wide values (it wins where both set a value): got inside
    a handler with :func:`call_recorder`. Invalid values (negative, not finite) are ignored."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: _Values | None = None

    def _v(self) -> _Values:
        if self._values is None:
            self._values = _Values()
        return self._values

    def _set(self, name: str, value: float) -> CallMetricRecorder:
        if _valid(value):
            setattr(self._v(), name, float(value))
        return self

    def record_cpu_utilization(self, value: float) -> CallMetricRecorder:
        return self._set("cpu", value)

    def record_memory_utilization(self, value: float) -> CallMetricRecorder:
        return self._set("mem", value)

    def record_application_utilization(self, value: float) -> CallMetricRecorder:
        return self._set("app", value)

    def record_qps(self, value: float) -> CallMetricRecorder:
        return self._set("qps", value)

    def record_eps(self, value: float) -> CallMetricRecorder:
        return self._set("eps", value)

    def record_utilization(self, name: str, value: float) -> CallMetricRecorder:
        if _valid(value):
            self._v().utilization[name] = float(value)
        return self

    def record_request_cost(self, name: str, value: float) -> CallMetricRecorder:
        """An absolute cost of this request (bytes read, rows scanned): any finite number."""
        if math.isfinite(value):
            self._v().request_cost[name] = float(value)
        return self

    def record_named_metric(self, name: str, value: float) -> CallMetricRecorder:
        """An application-specific metric (``named_metrics``): any finite number."""
        if math.isfinite(value):
            self._v().named[name] = float(value)
        return self

    @property
    def empty(self) -> bool:
        return self._values is None or self._values.empty()


_current: contextvars.ContextVar[CallMetricRecorder | None] = contextvars.ContextVar(
    "lookaside_grpc_orca_call", default=None
)


def call_recorder() -> CallMetricRecorder:
    """The current call's recorder, inside a handler of a server with an ORCA interceptor; outside one, a
    recorder nothing reads (so handlers need no check)."""
    got = _current.get()
    return got if got is not None else CallMetricRecorder()


def load_report_of(trailing: Iterable[tuple[str, str | bytes]] | None) -> OrcaLoadReport | None:
    """The ORCA report in a call's trailing metadata (:data:`MIRROR_TRAILER` or :data:`TRAILER`), or None
    when it carries none or it does not parse."""
    if not trailing:
        return None
    for key, value in trailing:
        if key in _KEYS and isinstance(value, bytes):
            try:
                return OrcaLoadReport.FromString(value)
            except Exception:  # a malformed report is no report (gRFC A58: the call is unaffected)
                return None
    return None


# -- interceptors ------------------------------------------------------------------------------------------


class _Core:
    """What both interceptors do around a handler: expose the call's recorder, count the call, attach the
    report."""

    def __init__(self, recorder: ServerMetricRecorder | None, mirror: bool) -> None:
        self.recorder = recorder if recorder is not None else ServerMetricRecorder()
        self.mirror = mirror

    def payload(self, call: CallMetricRecorder) -> bytes:
        if call.empty:
            return self.recorder.serialized()
        report = self.recorder.report()
        assert call._values is not None
        call._values.fill(report)
        return report.SerializeToString()

    def trailers(self, context: Any, payload: bytes) -> tuple[tuple[str, str | bytes], ...] | None:
        if not payload:
            return None
        existing = context.trailing_metadata() or ()
        ours: tuple[tuple[str, str | bytes], ...] = ((TRAILER, payload),)
        if self.mirror:
            ours += ((MIRROR_TRAILER, payload),)
        return tuple((k, v) for k, v in existing if k not in _KEYS) + ours

    def finish(self, context: Any, call: CallMetricRecorder, ok: bool) -> None:
        try:
            code = context.code()
            ok = ok and (code is None or code is grpc.StatusCode.OK)
        except Exception:
            pass
        self.recorder.count(ok)
        md = self.trailers(context, self.payload(call))
        if md is not None:
            context.set_trailing_metadata(md)


def _wrap_unary_response(core: _Core, behavior: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        call = CallMetricRecorder()
        token = _current.set(call)
        ok = False
        try:
            response = behavior(request, context)
            ok = True
            return response
        finally:
            _current.reset(token)
            core.finish(context, call, ok)

    return wrapped


def _wrap_stream_response(core: _Core, behavior: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = CallMetricRecorder()
        ok = False
        token = _current.set(call)
        try:
            responses = iter(behavior(request, context))
        finally:
            _current.reset(token)
        try:
            while True:
                token = _current.set(call)
                try:
                    response = next(responses)
                except StopIteration:
                    ok = True
                    return
                finally:
                    _current.reset(token)
                yield response
        finally:
            core.finish(context, call, ok)

    return wrapped


#: A method handler of any request and response types (generic in grpc's type stubs only).
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _handler(
    handler: Any,
    unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    stream: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> Handler:
    """``handler`` with its behavior wrapped (the same serializers and shape)."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), des, ser)
    return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), des, ser)


class OrcaServerInterceptor(grpc.ServerInterceptor):
    """Sync server interceptor: every call's trailers carry the ORCA load report (server-wide values from
    ``recorder``, overridden by the call's own, see :func:`call_recorder`); ``mirror`` also sends it under
    :data:`MIRROR_TRAILER` for grpcio clients. No report (no value set, no call measured yet): no trailer."""

    def __init__(self, recorder: ServerMetricRecorder | None = None, *, mirror: bool = True) -> None:
        self._core = _Core(recorder, mirror)

    @property
    def recorder(self) -> ServerMetricRecorder:
        return self._core.recorder

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        core = self._core
        return _handler(
            handler, lambda b: _wrap_unary_response(core, b), lambda b: _wrap_stream_response(core, b)
        )


def _aio_unary_response(core: _Core, behavior: Callable[..., Any]) -> Callable[..., Any]:
    if not inspect.iscoroutinefunction(behavior):
        return _wrap_unary_response(core, behavior)

    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = CallMetricRecorder()
        token = _current.set(call)
        ok = False
        # set before the handler runs too: grpc.aio's abort() sends the status (and the trailers set so far)
        # before it raises, so an aborted call still reports the server-wide load
        pre = core.trailers(context, core.recorder.serialized())
        if pre is not None:
            context.set_trailing_metadata(pre)
        try:
            response = await behavior(request, context)
            ok = True
            return response
        finally:
            _current.reset(token)
            core.finish(context, call, ok)

    return wrapped


def _aio_stream_response(core: _Core, behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(behavior):  # writes with context.write(), returns None
        return _aio_unary_response(core, behavior)
    if not inspect.isasyncgenfunction(behavior):
        return _wrap_stream_response(core, behavior)

    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        call = CallMetricRecorder()
        ok = False
        token = _current.set(call)
        try:
            responses: AsyncIterator[Any] = behavior(request, context).__aiter__()
        finally:
            _current.reset(token)
        pre = core.trailers(context, core.recorder.serialized())
        if pre is not None:
            context.set_trailing_metadata(pre)
        try:
            while True:
                token = _current.set(call)
                try:
                    response = await responses.__anext__()
                except StopAsyncIteration:
                    ok = True
                    return
                finally:
                    _current.reset(token)
                yield response
        finally:
            core.finish(context, call, ok)

    return wrapped


class AioOrcaServerInterceptor(grpc.aio.ServerInterceptor):
    """The grpc.aio twin of :class:`OrcaServerInterceptor` (coroutine, async-generator and plain
    handlers)."""

    def __init__(self, recorder: ServerMetricRecorder | None = None, *, mirror: bool = True) -> None:
        self._core = _Core(recorder, mirror)

    @property
    def recorder(self) -> ServerMetricRecorder:
        return self._core.recorder

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        core = self._core
        return _handler(
            handler, lambda b: _aio_unary_response(core, b), lambda b: _aio_stream_response(core, b)
        )


__all__ = [
    "AioOrcaServerInterceptor",
    "CallMetricRecorder",
    "DESCRIPTOR",
    "MIRROR_TRAILER",
    "OrcaLoadReport",
    "OrcaServerInterceptor",
    "POOL",
    "RATE_WINDOW",
    "ServerMetricRecorder",
    "TRAILER",
    "call_recorder",
    "load_report_of",
]
