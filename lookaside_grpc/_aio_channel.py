"""``Channel`` for grpc.aio: balances each call over pooled per-backend ``grpc.aio`` channels.

A call starts at once when a pick is available synchronously (watch mode with a known set, a batched pick
on hand); otherwise it starts once its awaited pick arrives (``_calls._aio``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeVar, Unpack, overload

import grpc
import grpc.aio

from lookaside_grpc import _balancer, _compat
from lookaside_grpc._balancer import AioBalancer, Lease
from lookaside_grpc._calls import _aio
from lookaside_grpc._calls._engine import (
    NO_ARGS,
    AioMethods,
    CallArgs,
    Deserializer,
    Method,
    Serializer,
    pick_aio,
)
from lookaside_grpc._channel import DEFAULT_INIT_TIMEOUT, pick_wait
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._errors import PickError, aio_error
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._settings import ClientOptions, Mode, Settings, make_settings, make_target
from lookaside_grpc._stats import Stats
from lookaside_grpc._target import Target
from lookaside_grpc._xds_mode import AioXdsChannel, Xds, XdsModeName, XdsOptions, is_xds, xds_settings

Req = TypeVar("Req")
Resp = TypeVar("Resp")
_now = time.monotonic


class _Multi:
    """What the four aio multicallables share: the channel, the method and the shape."""

    __slots__ = ("_channel", "_m", "_cls", "_retry")

    def __init__(self, channel: Channel, m: Method[grpc.aio.Channel, _aio.AioBackend], shape: str) -> None:
        self._channel = channel
        self._m = m
        self._cls, self._retry = _aio.SHAPES[shape]

    def _start(
        self,
        request: object,
        timeout: float | None,
        metadata: grpc.aio.Metadata | Sequence[tuple[str, str | bytes]] | None,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> _aio.AioCall[object, object]:
        ch = self._channel
        if ch._closed:
            raise grpc.aio.UsageError("Channel is closed.")  # as a closed grpc.aio channel
        balancer = ch._balancer
        deadline = None if timeout is None else _now() + timeout
        if metadata is None and credentials is None and wait_for_ready is None and compression is None:
            args = NO_ARGS
        else:
            args = CallArgs(metadata, credentials, wait_for_ready, compression)  # type: ignore[arg-type]
        ep = balancer.resolver.pick_nowait(balancer.policy, metadata)
        if ep is not None:  # the hot path
            return self._cls(self._m, request, deadline, args, self._retry, ep)
        wait, code = pick_wait(timeout, wait_for_ready, ch._init_timeout)

        async def at() -> Endpoint:
            try:
                return await pick_aio(balancer, wait, bool(wait_for_ready), code, metadata)
            except PickError as e:
                raise aio_error(e) from None

        return self._cls(self._m, request, deadline, args, self._retry, at)


class _UnaryUnary(_Multi, _compat.AioUnaryUnaryMultiCallable[Req, Resp]):
    __slots__ = ()

    def __call__(
        self,
        request: Req,
        *,
        timeout: float | None = None,
        metadata: grpc.aio.Metadata | Sequence[tuple[str, str | bytes]] | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.aio.UnaryUnaryCall[Req, Resp]:
        call = self._start(request, timeout, metadata, credentials, wait_for_ready, compression)
        return call  # type: ignore[return-value]  # a UnaryUnaryCall (no isinstance check per call)


class _UnaryStream(_Multi, _compat.AioUnaryStreamMultiCallable[Req, Resp]):
    __slots__ = ()

    def __call__(
        self,
        request: Req,
        *,
        timeout: float | None = None,
        metadata: grpc.aio.Metadata | Sequence[tuple[str, str | bytes]] | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.aio.UnaryStreamCall[Req, Resp]:
        call = self._start(request, timeout, metadata, credentials, wait_for_ready, compression)
        return call  # type: ignore[return-value]  # a UnaryStreamCall (no isinstance check per call)


class _StreamUnary(_Multi, _compat.AioStreamUnaryMultiCallable[Req, Resp]):
    __slots__ = ()

    def __call__(
        self,
        request_iterator: AsyncIterator[Req] | Iterator[Req] | None = None,
        timeout: float | None = None,
        metadata: grpc.aio.Metadata | Sequence[tuple[str, str | bytes]] | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.aio.StreamUnaryCall[Req, Resp]:
        call = self._start(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return call  # type: ignore[return-value]  # a StreamUnaryCall (no isinstance check per call)


class _StreamStream(_Multi, _compat.AioStreamStreamMultiCallable[Req, Resp]):
    __slots__ = ()

    def __call__(
        self,
        request_iterator: AsyncIterator[Req] | Iterator[Req] | None = None,
        timeout: float | None = None,
        metadata: grpc.aio.Metadata | Sequence[tuple[str, str | bytes]] | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.aio.StreamStreamCall[Req, Resp]:
        call = self._start(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return call  # type: ignore[return-value]  # a StreamStreamCall (no isinstance check per call)


def _backend(m: object) -> Method[grpc.aio.Channel, _aio.AioBackend]:
    return m  # type: ignore[return-value]


class Channel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` balancing every call over the pods of one Kubernetes Service.

    Build it with :func:`lookaside_grpc.aio.channel`; use it in the event loop that makes the calls.
    ``get_state``/``channel_ready`` report READY only while the target has a ready endpoint.
    """

    def __init__(self, lease: Lease[AioBalancer], init_timeout: float = DEFAULT_INIT_TIMEOUT) -> None:
        self._lease = lease
        self._balancer = lease.balancer
        self._init_timeout = init_timeout
        self._closed = False
        self._finalizer = _balancer.finalize_holder(self, lease)

    @property
    def target(self) -> Target:
        """The Kubernetes Service port the calls are balanced over."""
        return self._balancer.target

    @property
    def settings(self) -> Settings:
        """The settings this channel's (shared) balancer was built from."""
        return self._balancer.settings

    @property
    def mode(self) -> Mode:
        """:class:`Watch` or :class:`PerCall`."""
        return self._balancer.settings.mode

    @property
    def policy(self) -> RoutingPolicy:
        """The routing policy picking backends."""
        return self._balancer.policy

    def stats(self) -> Stats:
        """Counters of this channel's balancer (shared with channels/interceptors of equal settings)."""
        return self._balancer.stats()

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable[Req, Resp]:
        m = AioMethods.unary_unary(
            self._balancer, method, request_serializer, response_deserializer, bool(_registered_method)
        )
        return _UnaryUnary(self, _backend(m), "unary_unary")

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryStreamMultiCallable[Req, Resp]:
        m = AioMethods.unary_stream(
            self._balancer, method, request_serializer, response_deserializer, bool(_registered_method)
        )
        return _UnaryStream(self, _backend(m), "unary_stream")

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamUnaryMultiCallable[Req, Resp]:
        m = AioMethods.stream_unary(
            self._balancer, method, request_serializer, response_deserializer, bool(_registered_method)
        )
        return _StreamUnary(self, _backend(m), "stream_unary")

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer[Req] | None = None,
        response_deserializer: Deserializer[Resp] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamStreamMultiCallable[Req, Resp]:
        m = AioMethods.stream_stream(
            self._balancer, method, request_serializer, response_deserializer, bool(_registered_method)
        )
        return _StreamStream(self, _backend(m), "stream_stream")

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        """Give the balancer back; the last holder stops the watch task and closes every pooled channel
        (with ``grace``) and the lookaside channel."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        if self._lease.release():
            await self._balancer.aclose(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY while the target has a ready endpoint (CONNECTING/TRANSIENT_FAILURE/IDLE otherwise)."""
        if self._closed:
            return grpc.ChannelConnectivity.SHUTDOWN
        if try_to_connect:
            self._balancer.resolver.connect()
        return self._balancer.connectivity()

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Return once the state differs from ``last_observed_state``."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def on_state(state: grpc.ChannelConnectivity) -> None:
            if state is not last_observed_state:
                loop.call_soon_threadsafe(changed.set)

        self._balancer.subscribe(on_state)
        try:
            await changed.wait()
        finally:
            self._balancer.unsubscribe(on_state)

    async def channel_ready(self) -> None:
        """Wait until the target has a ready endpoint."""
        state = self.get_state(try_to_connect=True)
        while state is not grpc.ChannelConnectivity.READY:
            await self.wait_for_state_change(state)
            state = self.get_state(try_to_connect=True)


@overload
def channel(
    target: Target | str,
    *,
    namespace: str | None = None,
    port: str | int | None = None,
    lookaside: str | None = None,
    mode: Xds | XdsModeName,
    **options: Unpack[XdsOptions],
) -> AioXdsChannel: ...


@overload
def channel(
    target: Target | str,
    *,
    namespace: str | None = None,
    port: str | int | None = None,
    lookaside: str | None = None,
    init_timeout: float = DEFAULT_INIT_TIMEOUT,
    **options: Unpack[ClientOptions],
) -> Channel: ...


def channel(
    target: Target | str,
    *,
    namespace: str | None = None,
    port: str | int | None = None,
    lookaside: str | None = None,
    init_timeout: float | None = None,
    **options: Any,
) -> Channel | AioXdsChannel:
    """The grpc.aio twin of :func:`lookaside_grpc.channel`: same arguments, same behaviour.

    Channels with equal settings made in the same running event loop share one balancer; outside a
    running loop each channel gets its own (started on first use in a loop). ``mode="xds"``: grpc.aio's own
    ``xds:///<target>`` channel bootstrapped to the lookaside.
    """
    if is_xds(options.get("mode")):
        xs = xds_settings(target, namespace, port, lookaside, init_timeout, options)
        return AioXdsChannel(xs, options.get("credentials"))
    if init_timeout is None:
        init_timeout = DEFAULT_INIT_TIMEOUT
    settings = make_settings(make_target(target, namespace, port), lookaside, options)
    try:
        asyncio.get_running_loop()
        share = True
    except RuntimeError:
        share = False
    return Channel(_balancer.lease_aio(settings, share), init_timeout)
