"""lookaside-grpc: lookaside load balancing for gRPC on Kubernetes, keeping long-lived connections.

``lookaside_grpc.channel("greet.default")`` returns a ``grpc.Channel`` for any generated stub;
``lookaside_grpc.aio.channel(...)`` is the ``grpc.aio`` twin. For a channel the application already has:
``grpc.intercept_channel(channel, lookaside_grpc.LookasideInterceptor({"pkg.Service": "greet.default"}))``
(``lookaside_grpc.aio.interceptors(...)`` for grpc.aio). Every flavour takes the same options
(:class:`ClientOptions`); ``stats()`` / ``register_prometheus()`` expose the counters.
"""

import logging
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from lookaside_grpc._budget import RetryBudget
from lookaside_grpc._channel import DEFAULT_INIT_TIMEOUT, Channel, channel
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._interceptor import InterceptedChannel, LookasideInterceptor, intercepted_channel
from lookaside_grpc._policies import LeastRequest, PeakEwma, Random, RoundRobin, RoutingPolicy, Weighted
from lookaside_grpc._ring_hash import RingHash
from lookaside_grpc._routing import DEFAULT_ROUTE_WAIT
from lookaside_grpc._settings import (
    DEFAULT_LOOKASIDE_KEEPALIVE,
    DEFAULT_MAX_STALENESS,
    PER_CALL,
    WATCH,
    ClientOptions,
    Mode,
    PerCall,
    Settings,
    Watch,
)
from lookaside_grpc._stats import Histogram, Stats, register_prometheus, stats
from lookaside_grpc._target import InvalidTarget, Target
from lookaside_grpc._wrr import WeightedRoundRobin
from lookaside_grpc._xds_mode import XDS, Xds, XdsChannel

try:
    __version__: str = _version("lookaside-grpc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Channel",
    "ClientOptions",
    "DEFAULT_INIT_TIMEOUT",
    "DEFAULT_LOOKASIDE_KEEPALIVE",
    "DEFAULT_MAX_STALENESS",
    "DEFAULT_ROUTE_WAIT",
    "Endpoint",
    "Histogram",
    "InterceptedChannel",
    "InvalidTarget",
    "LeastRequest",
    "LookasideInterceptor",
    "Mode",
    "PER_CALL",
    "PeakEwma",
    "PerCall",
    "Random",
    "RetryBudget",
    "RoundRobin",
    "RingHash",
    "RoutingPolicy",
    "Settings",
    "Stats",
    "Target",
    "WATCH",
    "Watch",
    "Weighted",
    "WeightedRoundRobin",
    "XDS",
    "Xds",
    "XdsChannel",
    "__version__",
    "channel",
    "intercepted_channel",
    "register_prometheus",
    "stats",
]
