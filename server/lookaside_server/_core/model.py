"""Plain data model shared by sources, the registry and the RPC layer: targets and backend endpoints.

A target is the client's one :class:`~lookaside_grpc.protocol.Target` (``service.namespace[:port]``); the
server keys its state by the Service alone (port ""), and picks a port per request.
"""

from __future__ import annotations

from dataclasses import dataclass

from lookaside_grpc.protocol import Target

__all__ = ["BackendEndpoint", "Endpoints", "Target"]


@dataclass(frozen=True, slots=True)
class BackendEndpoint:
    """One backend address of a target: one entry per ip x port, with its EndpointSlice conditions.

    ``port`` is the number to dial on this backend (the EndpointSlice's, i.e. the Service's *target* port,
    which can differ per pod); ``service_port`` the Service port it belongs to (``spec.ports[].port``,
    matched by port name; 0 when unknown, e.g. a static file entry without one). Clients ask for a port by
    the Service port's number (:attr:`number`) or name, never by the target port.
    """

    ip: str
    port: int
    port_name: str = ""
    zone: str = ""
    for_zones: tuple[str, ...] = ()
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    service_port: int = 0

    @property
    def number(self) -> int:
        """The number clients ask for this port by: the Service port, else (none known) the own port."""
        return self.service_port or self.port

    @property
    def port_key(self) -> str:
        """How the port is identified: its name if it has one, else its (Service port) number."""
        return self.port_name or str(self.number)


#: The state of a target as published by a source; ``None`` means the target does not exist (any more).
Endpoints = tuple[BackendEndpoint, ...]
