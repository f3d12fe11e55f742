"""lookaside-grpc for ``grpc.aio``: ``lookaside_grpc.aio.channel(...)`` returns a ``grpc.aio.Channel``."""

from lookaside_grpc._aio_channel import Channel, channel
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._policies import Random, RoundRobin, RoutingPolicy
from lookaside_grpc._resolvers import PER_CALL, WATCH, Mode

__all__ = [
    "Channel",
    "Endpoint",
    "Mode",
    "PER_CALL",
    "Random",
    "RoundRobin",
    "RoutingPolicy",
    "WATCH",
    "channel",
]
