"""Backend endpoints and the local endpoint state a resolver keeps for one target."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from lookaside_grpc import protocol


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend (a pod's IP and port) to send calls to; ``address`` is what gRPC dials."""

    ip: str
    port: int
    zone: str = ""
    #: ``ip:port``, with IPv6 addresses in brackets (``[::1]:50051``); computed once.
    address: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ip = self.ip
        host = f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip
        object.__setattr__(self, "address", f"{host}:{self.port}")

    @classmethod
    def from_proto(cls, pb: protocol.Endpoint) -> Endpoint:
        """Build from the wire message."""
        return cls(pb.ip, pb.port, pb.zone)


class EndpointState:
    """The last endpoint set received for a target, plus the last resolution error.

    Readers take ``endpoints`` (an immutable tuple swapped atomically) without locking: that is the hot path.
    """

    __slots__ = ("endpoints", "version", "received", "error", "_lock")

    def __init__(self) -> None:
        self.endpoints: tuple[Endpoint, ...] = ()
        self.version: int = 0
        #: True once a first set (possibly empty) arrived.
        self.received: bool = False
        #: The last resolution failure (kept for error messages), cleared by the next set.
        self.error: Exception | None = None
        self._lock = threading.Lock()

    def update(self, endpoints: Iterable[Endpoint], version: int) -> tuple[set[str], set[str]]:
        """Replace the set; return (addresses added, addresses removed)."""
        new = tuple(dict.fromkeys(endpoints))  # de-duplicated, order kept
        with self._lock:
            old = {e.address for e in self.endpoints}
            self.endpoints = new
            self.version = version
            self.received = True
            self.error = None
        cur = {e.address for e in new}
        return cur - old, old - cur

    def addresses(self) -> set[str]:
        """The addresses of the current set."""
        return {e.address for e in self.endpoints}
