"""Types of greet_pb2_grpc.py, written by proto/generate.py (protoc writes none)."""

from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, overload

import grpc
import grpc.aio

from . import greet_pb2

_Context = grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any]


class GreetServiceStub:
    @overload
    def __new__(cls, channel: grpc.Channel) -> GreetServiceStub: ...
    @overload
    def __new__(cls, channel: grpc.aio.Channel) -> GreetServiceAsyncStub: ...
    Greet: grpc.UnaryUnaryMultiCallable[greet_pb2.GreetingRequest, greet_pb2.GreetingResponse]
    GreetManyTimes: grpc.UnaryStreamMultiCallable[greet_pb2.GreetingRequest, greet_pb2.GreetingResponse]
    LongGreet: grpc.StreamUnaryMultiCallable[greet_pb2.GreetingRequest, greet_pb2.GreetingResponse]
    GreetEveryone: grpc.StreamStreamMultiCallable[greet_pb2.GreetingRequest, greet_pb2.GreetingResponse]

class GreetServiceAsyncStub:
    def __init__(self, channel: grpc.aio.Channel) -> None: ...
    Greet: grpc.aio.UnaryUnaryMultiCallable[greet_pb2.GreetingRequest, greet_pb2.GreetingResponse]
    GreetManyTimes: grpc.aio.UnaryStreamMultiCallable[greet_pb2.GreetingRequest, greet_pb2.GreetingResponse]
    LongGreet: grpc.aio.StreamUnaryMultiCallable[greet_pb2.GreetingRequest, greet_pb2.GreetingResponse]
    GreetEveryone: grpc.aio.StreamStreamMultiCallable[greet_pb2.GreetingRequest, greet_pb2.GreetingResponse]

class GreetServiceServicer:
    def Greet(
        self, request: greet_pb2.GreetingRequest, context: _Context
    ) -> greet_pb2.GreetingResponse | Awaitable[greet_pb2.GreetingResponse]: ...
    def GreetManyTimes(
        self, request: greet_pb2.GreetingRequest, context: _Context
    ) -> Iterator[greet_pb2.GreetingResponse] | AsyncIterator[greet_pb2.GreetingResponse]: ...
    def LongGreet(
        self, request: Iterator[greet_pb2.GreetingRequest] | AsyncIterator[greet_pb2.GreetingRequest], context: _Context
    ) -> greet_pb2.GreetingResponse | Awaitable[greet_pb2.GreetingResponse]: ...
    def GreetEveryone(
        self, request: Iterator[greet_pb2.GreetingRequest] | AsyncIterator[greet_pb2.GreetingRequest], context: _Context
    ) -> Iterator[greet_pb2.GreetingResponse] | AsyncIterator[greet_pb2.GreetingResponse]: ...

def add_GreetServiceServicer_to_server(
    servicer: GreetServiceServicer, server: grpc.Server | grpc.aio.Server
) -> None: ...
