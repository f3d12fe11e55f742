"""Ending an RPC with a gRPC status; INVALID_ARGUMENT carries a google.rpc.BadRequest naming the field."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

#: Longest status message sent, in UTF-8 bytes. Messages quote what the client sent (names, ports):
#: unclipped, a long one made the trailers exceed the client's 16 KiB metadata limit (it saw
#: RESOURCE_EXHAUSTED instead of the real status) and let one 4 MB request make the server send ~16 MB of
#: trailers.
MAX_MESSAGE_BYTES = 1024


def clip(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut to at most ``limit`` UTF-8 bytes (on a character boundary), marked when cut."""
    raw = message.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return message
    return raw[: limit - 20].decode("utf-8", "ignore") + " ... (truncated)"


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` and ``message`` (clipped to MAX_MESSAGE_BYTES)."""
    await context.abort(code, clip(message))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


async def abort_invalid(context: grpc.aio.ServicerContext, field: str, message: str) -> NoReturn:
    """End the call with INVALID_ARGUMENT and a BadRequest detail whose field violation names ``field``."""
    message = clip(message)
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]
        )
    )
    st = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        message,
        trailing_metadata=rpc_status.to_status(st).trailing_metadata,
    )
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
