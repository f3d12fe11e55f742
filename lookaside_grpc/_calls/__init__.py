"""The one call engine: pick, bind to the pooled backend channel, count in flight, retry before send,
ejection feedback, for the four call shapes; used by both channel factories and both interceptors.

``_engine`` holds what is shape- and flavour-independent (:class:`Method`); ``_sync`` and ``_aio`` start
the calls and carry the one transparent retry in the call objects they return.
"""

from lookaside_grpc._calls._engine import AioMethods, CallArgs, Method, SyncMethods

__all__ = ["AioMethods", "CallArgs", "Method", "SyncMethods"]
