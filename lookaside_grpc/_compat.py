"""grpc's sync interfaces as generic bases: typed as grpc-stubs declares them (including its call-future and
call-iterator types), and subscriptable at runtime, where grpc's own classes are not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

import grpc

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
