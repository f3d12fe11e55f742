"""Types of lookaside_pb2_grpc.py, written by proto/generate.py (protoc writes none)."""

from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, overload

import grpc
import grpc.aio

from . import lookaside_pb2

_Context = grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any]


class LookasideStub:
    @overload
    def __new__(cls, channel: grpc.Channel) -> LookasideStub: ...
    @overload
    def __new__(cls, channel: grpc.aio.Channel) -> LookasideAsyncStub: ...
    Resolve: grpc.UnaryUnaryMultiCallable[lookaside_pb2.Request, lookaside_pb2.Response]
    Watch: grpc.UnaryStreamMultiCallable[lookaside_pb2.WatchRequest, lookaside_pb2.EndpointSet]
    Status: grpc.UnaryUnaryMultiCallable[lookaside_pb2.StatusRequest, lookaside_pb2.StatusResponse]
    ReportLoad: grpc.UnaryUnaryMultiCallable[lookaside_pb2.LoadReport, lookaside_pb2.LoadReportAck]

class LookasideAsyncStub:
    def __init__(self, channel: grpc.aio.Channel) -> None: ...
    Resolve: grpc.aio.UnaryUnaryMultiCallable[lookaside_pb2.Request, lookaside_pb2.Response]
    Watch: grpc.aio.UnaryStreamMultiCallable[lookaside_pb2.WatchRequest, lookaside_pb2.EndpointSet]
    Status: grpc.aio.UnaryUnaryMultiCallable[lookaside_pb2.StatusRequest, lookaside_pb2.StatusResponse]
    ReportLoad: grpc.aio.UnaryUnaryMultiCallable[lookaside_pb2.LoadReport, lookaside_pb2.LoadReportAck]

class LookasideServicer:
    def Resolve(
        self, request: lookaside_pb2.Request, context: _Context
    ) -> lookaside_pb2.Response | Awaitable[lookaside_pb2.Response]: ...
    def Watch(
        self, request: lookaside_pb2.WatchRequest, context: _Context
    ) -> Iterator[lookaside_pb2.EndpointSet] | AsyncIterator[lookaside_pb2.EndpointSet]: ...
    def Status(
        self, request: lookaside_pb2.StatusRequest, context: _Context
    ) -> lookaside_pb2.StatusResponse | Awaitable[lookaside_pb2.StatusResponse]: ...
    def ReportLoad(
        self, request: lookaside_pb2.LoadReport, context: _Context
    ) -> lookaside_pb2.LoadReportAck | Awaitable[lookaside_pb2.LoadReportAck]: ...

def add_LookasideServicer_to_server(
    servicer: LookasideServicer, server: grpc.Server | grpc.aio.Server
) -> None: ...
