"""Pick failures and how they surface to callers: as grpc.RpcError (sync) or grpc.aio.AioRpcError (aio)."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
import grpc.aio

from lookaside_grpc import _compat

#: Lookaside statuses that mean the caller asked for something wrong: passed through unchanged.
CALLER_ERRORS = frozenset(
    {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
)


class PickError(Exception):
    """No endpoint could be picked for a call; carries the gRPC status the call fails with."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str = "no_endpoints") -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        #: Why (a ``lookaside_grpc._stats`` fallback reason): interceptors count their fallbacks by it.
        self.reason = reason


def from_lookaside_error(err: grpc.RpcError, target: str, lookaside: str) -> PickError:
    """Map a failed Resolve/Watch to the status a call fails with: caller mistakes pass through."""
    code = err.code() if isinstance(err, grpc.Call | grpc.aio.AioRpcError) else None
    details = err.details() if isinstance(err, grpc.Call | grpc.aio.AioRpcError) else str(err)
    if code in CALLER_ERRORS:
        return PickError(code, details or "")
    name = code.name if code is not None else "UNKNOWN"
    return PickError(
        grpc.StatusCode.UNAVAILABLE, f"lookaside {lookaside} could not resolve {target}: {name}: {details}"
    )


class FailedCall(grpc.RpcError, _compat.CallFuture[NoReturn], _compat.CallIterator[NoReturn]):
    """A sync call that failed before reaching a backend: raised, or returned as a done future/iterator."""

    def __init__(self, error: PickError) -> None:
        super().__init__()
        self._code = error.code
        self._details = error.details

    def __repr__(self) -> str:
        return f"<{type(self).__name__} status={self._code.name} details={self._details!r}>"

    __str__ = __repr__

    # grpc.Call
    def initial_metadata(self) -> tuple[Any, ...]:
        return ()

    def trailing_metadata(self) -> tuple[Any, ...]:
        return ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def debug_error_string(self) -> str:
        return self._details

    # grpc.RpcContext
    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    # grpc.Future
    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> NoReturn:
        raise self

    def exception(self, timeout: float | None = None) -> FailedCall:
        return self

    def traceback(self, timeout: float | None = None) -> types.TracebackType | None:
        try:
            raise self
        except FailedCall:
            return sys.exc_info()[2]

    def add_done_callback(self, fn: Callable[[Any], None], timeout: float | None = None) -> None:
        fn(self)

    # response iterator (unary_stream / stream_stream)
    def __iter__(self) -> FailedCall:
        return self

    def __next__(self) -> NoReturn:
        raise self


def aio_error(error: PickError) -> grpc.aio.AioRpcError:
    """The AioRpcError an aio call fails with when no endpoint could be picked."""
    return grpc.aio.AioRpcError(
        error.code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=error.details, debug_error_string=None
    )
