"""lookaside-grpc: lookaside load balancing for gRPC on Kubernetes, keeping long-lived connections.

``lookaside_grpc.channel("greet", namespace="default")`` returns a ``grpc.Channel`` for any generated stub;
``lookaside_grpc.aio.channel(...)`` is the ``grpc.aio`` twin. For a channel the application already has:
``grpc.intercept_channel(channel, lookaside_grpc.LookasideInterceptor(lookaside=..., routes={...}))``
(``lookaside_grpc.aio.interceptors(...)`` for grpc.aio). ``stats()`` / ``register_prometheus()`` expose
the counters.
"""

from lookaside_grpc._balancer import DEFAULT_MAX_STALENESS
from lookaside_grpc._channel import Channel, channel
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._interceptor import LookasideInterceptor
from lookaside_grpc._policies import LeastRequest, PeakEwma, Random, RoundRobin, RoutingPolicy, Weighted
from lookaside_grpc._resolvers import PER_CALL, WATCH, Mode
from lookaside_grpc._routing import Target
from lookaside_grpc._stats import Stats, register_prometheus, stats

__all__ = [
    "Channel",
    "DEFAULT_MAX_STALENESS",
    "Endpoint",
    "LeastRequest",
    "LookasideInterceptor",
    "Mode",
    "PER_CALL",
    "PeakEwma",
    "Random",
    "RoundRobin",
    "RoutingPolicy",
    "Stats",
    "Target",
    "WATCH",
    "Weighted",
    "channel",
    "register_prometheus",
    "stats",
]
