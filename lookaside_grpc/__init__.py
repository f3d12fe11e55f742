"""lookaside-grpc: lookaside load balancing for gRPC on Kubernetes, keeping long-lived connections.

``lookaside_grpc.channel("greet", namespace="default")`` returns a ``grpc.Channel`` for any generated stub;
``lookaside_grpc.aio.channel(...)`` is the ``grpc.aio`` twin.
"""

from lookaside_grpc._channel import Channel, channel
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
