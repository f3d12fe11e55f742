"""grpc's interfaces as generic bases: typed as grpc-stubs declares them (including its call-future and
call-iterator types), and subscriptable at runtime, where grpc's own classes are not (sync: never; grpc.aio's
multicallables: only from grpcio 1.84). Subclass these, never ``grpc.aio.X[Req, Resp]`` itself: that
would raise TypeError at import on older grpcio."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

import grpc
import grpc.aio

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

if TYPE_CHECKING:
    Future = grpc.Future
    CallFuture = grpc._CallFuture
    CallIterator = grpc._CallIterator
    UnaryUnaryMultiCallable = grpc.UnaryUnaryMultiCallable
    UnaryStreamMultiCallable = grpc.UnaryStreamMultiCallable
    StreamUnaryMultiCallable = grpc.StreamUnaryMultiCallable
    StreamStreamMultiCallable = grpc.StreamStreamMultiCallable
    AioUnaryUnaryMultiCallable = grpc.aio.UnaryUnaryMultiCallable
    AioUnaryStreamMultiCallable = grpc.aio.UnaryStreamMultiCallable
    AioStreamUnaryMultiCallable = grpc.aio.StreamUnaryMultiCallable
    AioStreamStreamMultiCallable = grpc.aio.StreamStreamMultiCallable
    AioUnaryUnaryCall = grpc.aio.UnaryUnaryCall
    AioUnaryStreamCall = grpc.aio.UnaryStreamCall
    AioStreamUnaryCall = grpc.aio.StreamUnaryCall
    AioStreamStreamCall = grpc.aio.StreamStreamCall
else:

    class Future(grpc.Future, Generic[T]):
        """grpc.Future, subscriptable."""

    class CallFuture(grpc.Call, grpc.Future, Generic[T]):
        """A call that is also its future (what ``future()`` returns)."""

    class CallIterator(grpc.Call, Iterator, Generic[T]):
        """A call that is also its response iterator (what a response-streaming call returns)."""

    class UnaryUnaryMultiCallable(grpc.UnaryUnaryMultiCallable, Generic[Req, Resp]):
        """grpc.UnaryUnaryMultiCallable, subscriptable."""

    class UnaryStreamMultiCallable(grpc.UnaryStreamMultiCallable, Generic[Req, Resp]):
        """grpc.UnaryStreamMultiCallable, subscriptable."""

    class StreamUnaryMultiCallable(grpc.StreamUnaryMultiCallable, Generic[Req, Resp]):
        """grpc.StreamUnaryMultiCallable, subscriptable."""

    class StreamStreamMultiCallable(grpc.StreamStreamMultiCallable, Generic[Req, Resp]):
        """grpc.StreamStreamMultiCallable, subscriptable."""

    class AioUnaryUnaryMultiCallable(grpc.aio.UnaryUnaryMultiCallable, Generic[Req, Resp]):
        """grpc.aio.UnaryUnaryMultiCallable, subscriptable on every grpcio."""

    class AioUnaryStreamMultiCallable(grpc.aio.UnaryStreamMultiCallable, Generic[Req, Resp]):
        """grpc.aio.UnaryStreamMultiCallable, subscriptable on every grpcio."""

    class AioStreamUnaryMultiCallable(grpc.aio.StreamUnaryMultiCallable, Generic[Req, Resp]):
        """grpc.aio.StreamUnaryMultiCallable, subscriptable on every grpcio."""

    class AioStreamStreamMultiCallable(grpc.aio.StreamStreamMultiCallable, Generic[Req, Resp]):
        """grpc.aio.StreamStreamMultiCallable, subscriptable on every grpcio."""

    class AioUnaryUnaryCall(grpc.aio.UnaryUnaryCall, Generic[Req, Resp]):
        """grpc.aio.UnaryUnaryCall, subscriptable on every grpcio."""

    class AioUnaryStreamCall(grpc.aio.UnaryStreamCall, Generic[Req, Resp]):
        """grpc.aio.UnaryStreamCall, subscriptable on every grpcio."""

    class AioStreamUnaryCall(grpc.aio.StreamUnaryCall, Generic[Req, Resp]):
        """grpc.aio.StreamUnaryCall, subscriptable on every grpcio."""

    class AioStreamStreamCall(grpc.aio.StreamStreamCall, Generic[Req, Resp]):
        """grpc.aio.StreamStreamCall, subscriptable on every grpcio."""
