"""lookaside-grpc for ``grpc.aio``: ``lookaside_grpc.aio.channel(...)`` returns a ``grpc.aio.Channel``;
``grpc.aio.insecure_channel(addr, interceptors=lookaside_grpc.aio.interceptors(lookaside=..., routes={...}))``
balances an existing channel's calls (one interceptor object per call shape, as grpc.aio requires)."""

from lookaside_grpc._aio_channel import Channel, channel
from lookaside_grpc._aio_interceptor import LookasideInterceptor, interceptors
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._policies import LeastRequest, PeakEwma, Random, RoundRobin, RoutingPolicy, Weighted
from lookaside_grpc._resolvers import PER_CALL, WATCH, Mode
from lookaside_grpc._routing import Target

__all__ = [
    "Channel",
    "Endpoint",
    "LeastRequest",
    "LookasideInterceptor",
    "Mode",
    "PER_CALL",
    "PeakEwma",
    "Random",
    "RoundRobin",
    "RoutingPolicy",
    "Target",
    "WATCH",
    "Weighted",
    "channel",
    "interceptors",
]
