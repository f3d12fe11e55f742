"""The lookaside server: tells gRPC clients which backend of a Kubernetes Service to use.

Endpoints come from an :class:`EndpointSource`: a static file (:class:`StaticFileSource`) or the Kubernetes
API (:class:`KubernetesSource`: EndpointSlices, or core/v1 Endpoints on old clusters).

Names are imported on first use (PEP 562), so that ``python -m lookaside_server`` without the server extra
reaches :mod:`lookaside_server.__main__`, which says in one line what to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Public name -> the module that defines it.
_EXPORTS = {
    "AccessConfig": "lookaside_server._config",
    "BackendEndpoint": "lookaside_server._core.model",
    "EndpointSource": "lookaside_server._sources.base",
    "HttpConfig": "lookaside_server._config",
    "KubeTimings": "lookaside_server._sources.kubernetes",
    "KubernetesSource": "lookaside_server._sources.kubernetes",
    "ListenConfig": "lookaside_server._config",
    "LookasideServer": "lookaside_server._app",
    "Publish": "lookaside_server._sources.base",
    "RunningServer": "lookaside_server._thread",
    "SecurityConfig": "lookaside_server._config",
    "ServerConfig": "lookaside_server._config",
    "SourceUnavailable": "lookaside_server._sources.base",
    "StaticFileConfig": "lookaside_server._config",
    "StaticFileError": "lookaside_server._sources.static",
    "StaticFileSource": "lookaside_server._sources.static",
    "Target": "lookaside_server._core.model",
    "TargetNotFound": "lookaside_server._sources.base",
    "TooManyTargets": "lookaside_server._sources.base",
    "XdsConfig": "lookaside_server._config",
    "run_in_thread": "lookaside_server._thread",
}

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


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (and keep it)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
