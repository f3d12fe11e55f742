"""grpc's sync interfaces as generic bases: typed as grpc-stubs declares them, and subscriptable at
runtime (grpc's own classes are not) so call objects and multicallables can subclass ``X[Req, Resp]``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

import grpc

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

if TYPE_CHECKING:
    from grpc import Future as Future
    from grpc import StreamStreamMultiCallable as StreamStreamMultiCallable
    from grpc import StreamUnaryMultiCallable as StreamUnaryMultiCallable
    from grpc import UnaryStreamMultiCallable as UnaryStreamMultiCallable
    from grpc import UnaryUnaryMultiCallable as UnaryUnaryMultiCallable
else:

    class Future(grpc.Future, Generic[T]):
        """grpc.Future, subscriptable."""

    class UnaryUnaryMultiCallable(grpc.UnaryUnaryMultiCallable, Generic[Req, Resp]):
        """grpc.UnaryUnaryMultiCallable, subscriptable."""

    class UnaryStreamMultiCallable(grpc.UnaryStreamMultiCallable, Generic[Req, Resp]):
        """grpc.UnaryStreamMultiCallable, subscriptable."""

    class StreamUnaryMultiCallable(grpc.StreamUnaryMultiCallable, Generic[Req, Resp]):
        """grpc.StreamUnaryMultiCallable, subscriptable."""

    class StreamStreamMultiCallable(grpc.StreamStreamMultiCallable, Generic[Req, Resp]):
        """grpc.StreamStreamMultiCallable, subscriptable."""
