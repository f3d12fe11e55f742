"""Ending an RPC with a gRPC status; INVALID_ARGUMENT carries a google.rpc.BadRequest naming the field."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` and ``message``."""
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


async def abort_invalid(context: grpc.aio.ServicerContext, field: str, message: str) -> NoReturn:
    """End the call with INVALID_ARGUMENT and a BadRequest detail whose field violation names ``field``."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]
    ))
    st = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message,
                        trailing_metadata=rpc_status.to_status(st).trailing_metadata)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
