"""The lookaside server: tells gRPC clients which backend of a Kubernetes Service to use.

Endpoints come from an :class:`EndpointSource` (a static file here; Kubernetes EndpointSlices
plug in the same way).
"""

from lookaside_server._app import LookasideServer, ServerConfig
from lookaside_server._model import BackendEndpoint, Target
from lookaside_server._source import EndpointSource, Publish, TargetNotFound
from lookaside_server._static import StaticFileError, StaticFileSource
from lookaside_server._thread import RunningServer, run_in_thread

__all__ = [
    "BackendEndpoint",
    "EndpointSource",
    "LookasideServer",
    "Publish",
    "RunningServer",
    "ServerConfig",
    "StaticFileError",
    "StaticFileSource",
    "Target",
    "TargetNotFound",
    "run_in_thread",
]
