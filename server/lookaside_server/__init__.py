"""The lookaside server: tells gRPC clients which backend of a Kubernetes Service to use.

Endpoints come from an :class:`EndpointSource`: a static file (:class:`StaticFileSource`) or the Kubernetes
API (:class:`KubernetesSource`: EndpointSlices, or core/v1 Endpoints on old clusters).
"""

from lookaside_server._app import LookasideServer
from lookaside_server._config import (
    AccessConfig,
    HttpConfig,
    ListenConfig,
    SecurityConfig,
    ServerConfig,
    StaticFileConfig,
    XdsConfig,
)
from lookaside_server._core.model import BackendEndpoint, Target
from lookaside_server._sources.base import (
    EndpointSource,
    Publish,
    SourceUnavailable,
    TargetNotFound,
    TooManyTargets,
)
from lookaside_server._sources.kubernetes import KubernetesSource, KubeTimings
from lookaside_server._sources.static import StaticFileError, StaticFileSource
from lookaside_server._thread import RunningServer, run_in_thread

__all__ = [
    "AccessConfig",
    "BackendEndpoint",
    "EndpointSource",
    "HttpConfig",
    "KubeTimings",
    "KubernetesSource",
    "ListenConfig",
    "LookasideServer",
    "Publish",
    "RunningServer",
    "SecurityConfig",
    "ServerConfig",
    "SourceUnavailable",
    "StaticFileError",
    "StaticFileConfig",
    "StaticFileSource",
    "Target",
    "TargetNotFound",
    "TooManyTargets",
    "XdsConfig",
    "run_in_thread",
]
