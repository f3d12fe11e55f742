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
    #: Relative share of calls for the ``weighted`` policy (from the lookaside); 0 = unknown (equal share).
    #: Not part of the identity: the same pod with a new weight is the same endpoint.
    weight: int = field(default=0, compare=False)
    #: EndpointSlice ``hints.forZones``: the zones whose clients should use this endpoint (empty = no hint).
    for_zones: tuple[str, ...] = field(default=(), compare=False)
    #: ``ip:port``, with IPv6 addresses in brackets (``[::1]:50051``); computed once.
    address: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ip = self.ip
        host = f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip
        object.__setattr__(self, "address", f"{host}:{self.port}")

    @classmethod
    def from_proto(cls, pb: protocol.Endpoint) -> Endpoint:
        """Build from the wire message."""
        return cls(pb.ip, pb.port, pb.zone, pb.weight, tuple(pb.for_zones))


class EndpointState:
    """The last endpoint set received for a target, plus the last resolution error.

    Readers take ``endpoints`` (an immutable tuple swapped atomically) without locking: that is the hot path.
    ``endpoints`` is the set eligible for picks: the full set (``full``) minus locally ejected addresses
    (unless that would leave nothing: then ejections are ignored), or empty once the set went stale.
    """

    __slots__ = ("endpoints", "full", "ejected", "stale", "version", "received", "error", "_lock")

    def __init__(self) -> None:
        self.endpoints: tuple[Endpoint, ...] = ()
        self.full: tuple[Endpoint, ...] = ()
        self.ejected: frozenset[str] = frozenset()
        #: True once the set is older than ``max_staleness`` (cleared by the next set).
        self.stale = False
        self.version: int = 0
        #: True once a first set (possibly empty) arrived.
        self.received: bool = False
        #: The last resolution failure (kept for error messages), cleared by the next set.
        self.error: Exception | None = None
        self._lock = threading.Lock()

    def _recompute(self) -> None:
        if self.stale:
            self.endpoints = ()
            return
        full = self.full
        if self.ejected:
            eligible = tuple(e for e in full if e.address not in self.ejected)
            self.endpoints = eligible or full
        else:
            self.endpoints = full

    def update(self, endpoints: Iterable[Endpoint], version: int) -> tuple[set[str], set[str]]:
        """Replace the set; return (addresses added, addresses removed)."""
        new = tuple(dict.fromkeys(endpoints))  # de-duplicated, order kept
        with self._lock:
            old = {e.address for e in self.full}
            self.full = new
            self.version = version
            self.received = True
            self.stale = False
            self.error = None
            self._recompute()
        cur = {e.address for e in new}
        return cur - old, old - cur

    def set_ejected(self, ejected: frozenset[str]) -> None:
        """Exclude these addresses from picks (until the next call with a different set)."""
        with self._lock:
            self.ejected = ejected
            self._recompute()

    def expire(self) -> None:
        """Mark the set stale: no more local picks until a fresh set arrives."""
        with self._lock:
            self.stale = True
            self._recompute()

    def addresses(self) -> set[str]:
        """The addresses of the current (full) set."""
        return {e.address for e in self.full}
