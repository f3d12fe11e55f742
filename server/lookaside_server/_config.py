"""The server's configuration: :class:`ServerConfig`, made of nested frozen parts.

    ServerConfig(
        listen=ListenConfig(host="127.0.0.1", port=0),
        source=StaticFileConfig("endpoints.yaml"),          # or a ready-made EndpointSource
        security=SecurityConfig(tls=TlsConfig(...), access=AccessConfig(namespaces=frozenset({"default"}))),
        limits=Limits(max_watches=1000),
        http=HttpConfig(port=8080),
        xds=XdsConfig(enabled=True),
    )

Every part has working defaults, so ``ServerConfig(source=StaticFileConfig(path))`` is a whole configuration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lookaside_server._security.limits import Limits
from lookaside_server._security.tls import TlsConfig
from lookaside_server._sources.base import EndpointSource
from lookaside_server._web.http import HttpLimits

if TYPE_CHECKING:  # the xDS resources need the optional xds-protos package
    from lookaside_server._xds.resources import XdsOptions

DEFAULT_PORT = 50055
DEFAULT_HOST = "[::]"


@dataclass(frozen=True)
class ListenConfig:
    """Where the gRPC port listens and how long in-flight calls get on shutdown."""

    host: str = DEFAULT_HOST
    #: 0 = any free port.
    port: int = DEFAULT_PORT
    #: Seconds in-flight calls get to finish on stop.
    grace: float = 5.0


@dataclass(frozen=True)
class StaticFileConfig:
    """The static file source: a YAML/JSON file of targets, re-read when it changes."""

    path: str | os.PathLike[str]
    #: Seconds between looks at the file when no file-system notification is available (and as a safety net
    #: when it is).
    poll_interval: float = 1.0
    #: Most targets subscribed at once (None: no limit); more answer RESOURCE_EXHAUSTED.
    max_targets: int | None = None
    #: Notice changes through file-system notification (inotify) where the platform has it.
    notify: bool = True

    def __post_init__(self) -> None:
        if self.poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        if self.max_targets is not None and self.max_targets < 1:
            raise ValueError("max_targets must be at least 1 (or None for no limit)")


@dataclass(frozen=True)
class AccessConfig:
    """Who may resolve what (see ``_security.access.AccessPolicy``); None everywhere = no restriction."""

    #: Namespaces clients may resolve (others get PERMISSION_DENIED).
    namespaces: frozenset[str] | None = None
    #: Per-namespace Service rules (namespace -> services, ``*`` = all of it).
    services: Mapping[str, frozenset[str]] | None = field(default=None, compare=False)
    #: Client certificate identity globs (needs mutual TLS).
    client_identities: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SecurityConfig:
    """TLS of the gRPC port (None: plaintext; with a client CA: mutual TLS) and the access rules."""

    tls: TlsConfig | None = None
    access: AccessConfig = field(default_factory=AccessConfig)

    def __post_init__(self) -> None:
        if self.access.client_identities is not None and (self.tls is None or not self.tls.mutual):
            raise ValueError(
                "--allow-client-identity needs mutual TLS (--tls-cert, --tls-key and --tls-client-ca)"
            )


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP listener (status page, /status.json, /healthz, /metrics)."""

    #: 0 = any free port, None = no HTTP listener.
    port: int | None = None
    #: Address to bind; None = the same as the gRPC port's host.
    host: str | None = None
    #: If the port cannot be bound, log a warning and serve gRPC anyway (used for the default port).
    optional: bool = False
    #: Connection cap, header and idle timeouts of the listener (``_web.http.HttpLimits``).
    limits: HttpLimits = field(default_factory=HttpLimits)


@dataclass(frozen=True)
class XdsConfig:
    """xDS (ADS, state of the world, v3) on the gRPC port for stock gRPC ``xds:///`` clients."""

    enabled: bool = True
    #: Shape of the resources (``_xds.resources.XdsOptions``); None = the defaults.
    options: XdsOptions | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ServerConfig:
    """What to listen on, where endpoints come from, security, limits, the HTTP listener and xDS."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    #: The static file, or a ready-made source (e.g. Kubernetes EndpointSlices); None = not configured.
    source: StaticFileConfig | EndpointSource | None = field(default=None, compare=False)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    #: Message size, stream and keepalive limits of the gRPC port.
    limits: Limits = field(default_factory=Limits)
    http: HttpConfig = field(default_factory=HttpConfig)
    xds: XdsConfig = field(default_factory=XdsConfig)

    def make_source(self) -> EndpointSource:
        """The configured endpoint source; raise ValueError if none is configured."""
        if isinstance(self.source, StaticFileConfig):
            from lookaside_server._sources.static import StaticFileSource

            return StaticFileSource.from_config(self.source)
        if self.source is None:
            raise ValueError("no endpoint source configured (set a static file)")
        return self.source
