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
    Greet: grpc.UnaryUnaryMultiCallable[greet_pb2.Greeting, greet_pb2.GreetResponse]
    GreetManyTimes: grpc.UnaryStreamMultiCallable[greet_pb2.Greeting, greet_pb2.GreetResponse]
    LongGreet: grpc.StreamUnaryMultiCallable[greet_pb2.Greeting, greet_pb2.GreetResponse]
    GreetEveryone: grpc.StreamStreamMultiCallable[greet_pb2.Greeting, greet_pb2.GreetResponse]

class GreetServiceAsyncStub:
    def __init__(self, channel: grpc.aio.Channel) -> None: ...
    Greet: grpc.aio.UnaryUnaryMultiCallable[greet_pb2.Greeting, greet_pb2.GreetResponse]
    GreetManyTimes: grpc.aio.UnaryStreamMultiCallable[greet_pb2.Greeting, greet_pb2.GreetResponse]
    LongGreet: grpc.aio.StreamUnaryMultiCallable[greet_pb2.Greeting, greet_pb2.GreetResponse]
    GreetEveryone: grpc.aio.StreamStreamMultiCallable[greet_pb2.Greeting, greet_pb2.GreetResponse]

class GreetServiceServicer:
    def Greet(
        self, request: greet_pb2.Greeting, context: _Context
    ) -> greet_pb2.GreetResponse | Awaitable[greet_pb2.GreetResponse]: ...
    def GreetManyTimes(
        self, request: greet_pb2.Greeting, context: _Context
    ) -> Iterator[greet_pb2.GreetResponse] | AsyncIterator[greet_pb2.GreetResponse]: ...
    def LongGreet(
        self, request: Iterator[greet_pb2.Greeting] | AsyncIterator[greet_pb2.Greeting], context: _Context
    ) -> greet_pb2.GreetResponse | Awaitable[greet_pb2.GreetResponse]: ...
    def GreetEveryone(
        self, request: Iterator[greet_pb2.Greeting] | AsyncIterator[greet_pb2.Greeting], context: _Context
    ) -> Iterator[greet_pb2.GreetResponse] | AsyncIterator[greet_pb2.GreetResponse]: ...

def add_GreetServiceServicer_to_server(
    servicer: GreetServiceServicer, server: grpc.Server | grpc.aio.Server
) -> None: ...
