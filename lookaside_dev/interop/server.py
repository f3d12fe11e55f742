"""An in-process interop TestService backend on 127.0.0.1 (any free port).

Every reply is signed with the backend's ``host:port`` (``server_id`` in the reply and the ``x-served-by``
trailing metadata), so a test can see which backend answered. Like gRPC's interop server it echoes the
``x-grpc-test-echo-initial`` request metadata as initial metadata and ``x-grpc-test-echo-trailing-bin`` as
trailing metadata, ends a call with a requested ``response_status``, and sends requested payload sizes;
``SimpleRequest.sleep_ms`` and ``ResponseParameters.interval_us`` make it sleep (bounded by the call's
deadline: it stops once the call is no longer active).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc

from lookaside_dev.interop.v1 import empty_pb2, messages_pb2, test_pb2_grpc

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"
SERVED_BY = "x-served-by"
SERVICE = "lookaside.interop.v1.TestService"
UNIMPLEMENTED_SERVICE = "lookaside.interop.v1.UnimplementedService"


def _payload(size: int) -> messages_pb2.Payload:
    return messages_pb2.Payload(body=b"\0" * size)


class TestServicer(test_pb2_grpc.TestServiceServicer):
    """The interop TestService; ``UnimplementedCall`` is left to the generated base (UNIMPLEMENTED)."""

    __test__ = False  # not a pytest class

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        #: set when a call ends by cancellation (seen by the server)
        self.cancelled = threading.Event()

    def _begin(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls[method] += 1
        md = dict(context.invocation_metadata())
        if ECHO_INITIAL in md:
            context.send_initial_metadata(((ECHO_INITIAL, md[ECHO_INITIAL]),))
        trailing: list[tuple[str, str | bytes]] = [(SERVED_BY, self.server_id)]
        if ECHO_TRAILING in md:
            trailing.append((ECHO_TRAILING, md[ECHO_TRAILING]))
        context.set_trailing_metadata(tuple(trailing))

    @staticmethod
    def _status(status: messages_pb2.EchoStatus, context: grpc.ServicerContext) -> None:
        if status.code:
            code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
            context.abort(code, status.message)

    @staticmethod
    def _sleep(seconds: float, context: grpc.ServicerContext) -> None:
        """Sleep up to ``seconds``, waking early when the call ends (cancelled or deadline)."""
        ended = threading.Event()
        if context.add_callback(ended.set):  # False: the call has already ended
            ended.wait(seconds)

    def total(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def EmptyCall(self, request: empty_pb2.Empty, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._begin("EmptyCall", context)
        return empty_pb2.Empty()

    def UnaryCall(
        self, request: messages_pb2.SimpleRequest, context: grpc.ServicerContext
    ) -> messages_pb2.SimpleResponse:
        self._begin("UnaryCall", context)
        if request.sleep_ms:
            self._sleep(request.sleep_ms / 1000, context)
        self._status(request.response_status, context)
        return messages_pb2.SimpleResponse(payload=_payload(request.response_size), server_id=self.server_id)

    def StreamingOutputCall(
        self, request: messages_pb2.StreamingOutputCallRequest, context: grpc.ServicerContext
    ) -> Iterator[messages_pb2.StreamingOutputCallResponse]:
        self._begin("StreamingOutputCall", context)
        for params in request.response_parameters:
            if params.interval_us:
                self._sleep(params.interval_us / 1e6, context)
            if not context.is_active():
                return
            yield messages_pb2.StreamingOutputCallResponse(
                payload=_payload(params.size), server_id=self.server_id
            )
        self._status(request.response_status, context)

    def StreamingInputCall(
        self,
        request_iterator: Iterator[messages_pb2.StreamingInputCallRequest],
        context: grpc.ServicerContext,
    ) -> messages_pb2.StreamingInputCallResponse:
        self._begin("StreamingInputCall", context)
        total = 0
        try:
            for request in request_iterator:
                total += len(request.payload.body)
        finally:
            if not context.is_active():
                self.cancelled.set()
        return messages_pb2.StreamingInputCallResponse(
            aggregated_payload_size=total, server_id=self.server_id
        )

    def FullDuplexCall(
        self,
        request_iterator: Iterator[messages_pb2.StreamingOutputCallRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[messages_pb2.StreamingOutputCallResponse]:
        self._begin("FullDuplexCall", context)
        try:
            for request in request_iterator:
                self._status(request.response_status, context)
                for params in request.response_parameters:
                    if params.interval_us:
                        self._sleep(params.interval_us / 1e6, context)
                    if not context.is_active():
                        return
                    yield messages_pb2.StreamingOutputCallResponse(
                        payload=_payload(params.size), server_id=self.server_id
                    )
        finally:
            if not context.is_active():
                self.cancelled.set()


class InteropBackend:
    """One TestService server on 127.0.0.1 (``port`` 0: any free one; context manager); ``options`` for the
    server."""

    def __init__(
        self, port: int = 0, max_workers: int = 16, options: tuple[tuple[str, object], ...] = ()
    ) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.address = f"127.0.0.1:{self.port}"
        self.servicer = TestServicer(self.address)
        test_pb2_grpc.add_TestServiceServicer_to_server(self.servicer, self.server)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)

    def __enter__(self) -> InteropBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
