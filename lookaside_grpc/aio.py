"""lookaside-grpc for ``grpc.aio``: ``lookaside_grpc.aio.channel(...)`` returns a ``grpc.aio.Channel``;
``grpc.aio.insecure_channel(addr, interceptors=lookaside_grpc.aio.interceptors(routes, ...))`` balances an
existing channel's calls (one interceptor object per call shape, as grpc.aio requires). Same options as the
sync flavour (:class:`ClientOptions`)."""

from lookaside_grpc._aio_channel import Channel, channel
from lookaside_grpc._aio_interceptor import LookasideInterceptor, intercepted_channel, interceptors
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._policies import LeastRequest, PeakEwma, Random, RoundRobin, RoutingPolicy, Weighted
from lookaside_grpc._settings import PER_CALL, WATCH, ClientOptions, Mode, PerCall, Settings, Watch
from lookaside_grpc._target import InvalidTarget, Target
from lookaside_grpc._xds_mode import XDS, AioXdsChannel, Xds

__all__ = [
    "AioXdsChannel",
    "Channel",
    "ClientOptions",
    "Endpoint",
    "InvalidTarget",
    "LeastRequest",
    "LookasideInterceptor",
    "Mode",
    "PER_CALL",
    "PeakEwma",
    "PerCall",
    "Random",
    "RoundRobin",
    "RoutingPolicy",
    "Settings",
    "Target",
    "WATCH",
    "Watch",
    "Weighted",
    "XDS",
    "Xds",
    "channel",
    "intercepted_channel",
    "interceptors",
]
