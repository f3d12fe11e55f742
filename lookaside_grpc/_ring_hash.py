"""Consistent hashing keyed by call metadata: the ``ring_hash`` policy and a pure-Python XXH64.

The ring is gRPC's own (gRFC A42, as C-core's ``ring_hash`` builds it, itself Envoy's): every endpoint gets
``scale * normalized weight`` entries hashed from ``"<ip:port>_<n>"`` with XXH64 (seed 0), ``scale`` is the
smallest ring of at least :data:`MIN_RING_SIZE` entries giving the lightest endpoint a whole number of them
(at most :data:`MAX_RING_SIZE`, C-core's default cap), and a call goes to the first entry whose hash is >= the
XXH64 of its metadata value (several values joined with ``","``, as grpc joins them). With the same endpoints
and weights a stock grpc client (xDS ``RING_HASH`` with a header hash policy, or ``ring_hash_experimental``
with ``requestHashHeader``) sends a key to the same pod. A call without the key gets a random ring position,
as grpc gives it a random hash. Ejected endpoints are skipped by walking the ring to the next entry (A42's
failover), so the keys of the others stay where they are; the ring itself changes only with the set.
XXH64 is implemented here because the client depends on grpcio and protobuf only.
"""

from __future__ import annotations

import math
import random
import struct
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._policies import RoutingPolicy

_M64 = (1 << 64) - 1
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5
_Q = struct.Struct("<Q").unpack_from
_L = struct.Struct("<L").unpack_from
_4Q = struct.Struct("<4Q").unpack_from

#: Call metadata as the grpc flavours and interceptors hand it over: (key, value) pairs.
Metadata = Iterable[tuple[str, str | bytes]]

#: gRPC's default ``min_ring_size`` (A42, Envoy).
MIN_RING_SIZE = 1024
#: C-core's default ring size cap (``grpc.lb.ring_hash.ring_size_cap``), which bounds A42's 8M default
#: ``max_ring_size``: the ring a stock grpc client builds unless told otherwise.
MAX_RING_SIZE = 4096
#: The largest ring A42 allows (``min_ring_size``/``max_ring_size`` above it are refused by grpc).
RING_SIZE_LIMIT = 8_388_608
#: Most metadata values whose hash is remembered (hot keys skip XXH64); the memo is cleared when full.
HASH_MEMO_SIZE = 4096


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & _M64
    acc = ((acc << 31) | (acc >> 33)) & _M64
    return (acc * _P1) & _M64


def _merge(acc: int, v: int) -> int:
    acc ^= _round(0, v)
    return (acc * _P1 + _P4) & _M64


def _finish(
    data: bytes,
    i: int,
    h: int,
    _m: int = _M64,
    _p1: int = _P1,
    _p2: int = _P2,
    _p3: int = _P3,
    _p4: int = _P4,
    _p5: int = _P5,
) -> int:
    """XXH64's tail (the bytes from ``i`` on, into ``h``) and avalanche; constants bound as locals, as a
    short key is all tail and this runs per call on a new key."""
    n = len(data)
    while i + 8 <= n:
        k = (_Q(data, i)[0] * _p2) & _m
        h ^= ((((k << 31) | (k >> 33)) & _m) * _p1) & _m
        h = ((((h << 27) | (h >> 37)) & _m) * _p1 + _p4) & _m
        i += 8
    if i + 4 <= n:
        h ^= (_L(data, i)[0] * _p1) & _m
        h = ((((h << 23) | (h >> 41)) & _m) * _p2 + _p3) & _m
        i += 4
    while i < n:
        h ^= (data[i] * _p5) & _m
        h = ((((h << 11) | (h >> 53)) & _m) * _p1) & _m
        i += 1
    h ^= h >> 33
    h = (h * _p2) & _m
    h ^= h >> 29
    h = (h * _p3) & _m
    return h ^ (h >> 32)


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` (the xxHash spec's 64-bit hash, as ``XXH64(data, len, seed)``)."""
    n = len(data)
    if n < 32:
        return _finish(data, 0, (seed + _P5 + n) & _M64)
    v1 = (seed + _P1 + _P2) & _M64
    v2 = (seed + _P2) & _M64
    v3 = seed & _M64
    v4 = (seed - _P1) & _M64
    i = 0
    while i + 32 <= n:
        a, b, c, d = _4Q(data, i)
        v1, v2, v3, v4 = _round(v1, a), _round(v2, b), _round(v3, c), _round(v4, d)
        i += 32
    h = (
        ((v1 << 1) | (v1 >> 63))
        + ((v2 << 7) | (v2 >> 57))
        + ((v3 << 12) | (v3 >> 52))
        + ((v4 << 18) | (v4 >> 46))
    ) & _M64
    h = _merge(_merge(_merge(_merge(h, v1), v2), v3), v4)
    return _finish(data, i, (h + n) & _M64)


_memo: dict[bytes, int] = {}


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def request_hash(metadata: Metadata | None, key: str) -> int | None:
    """The XXH64 of the call's ``key`` metadata value (several values joined with ``","``, as grpc joins
    them before hashing); None when the call has no such value."""
    if not metadata:
        return None
    value: bytes | None = None
    for k, v in metadata:
        if k == key:
            value = _as_bytes(v) if value is None else value + b"," + _as_bytes(v)
    if value is None:
        return None
    h = _memo.get(value)
    if h is None:
        h = xxh64(value)
        if len(_memo) >= HASH_MEMO_SIZE:
            _memo.clear()
        _memo[value] = h
    return h


class Ring:
    """A built ring: entry hashes in ascending order and the endpoint owning each entry."""

    __slots__ = ("hashes", "owners", "key")

    def __init__(self, hashes: list[int], owners: list[Endpoint], key: tuple[tuple[str, int], ...]) -> None:
        self.hashes = hashes
        self.owners = owners
        #: The (address, weight) pairs the ring was built from (an equal set reuses it).
        self.key = key

    def index(self, h: int) -> int:
        """The entry a hash lands on: the first whose hash is >= ``h``, wrapping to the first."""
        i = bisect_left(self.hashes, h)
        return 0 if i == len(self.hashes) else i

    def share(self) -> dict[str, int]:
        """Entries per endpoint address (for tests and the benchmark)."""
        out: dict[str, int] = {}
        for e in self.owners:
            out[e.address] = out.get(e.address, 0) + 1
        return out


def build_ring(
    endpoints: Sequence[Endpoint],
    min_ring_size: int = MIN_RING_SIZE,
    max_ring_size: int = MAX_RING_SIZE,
    point_hashes: dict[str, list[int]] | None = None,
    entries_per_endpoint: int | None = None,
) -> Ring:
    """The ring of ``endpoints`` as C-core builds it (weights: ``Endpoint.weight``, 0 = 1). ``point_hashes``
    (address -> its entry hashes so far) saves rehashing the entries of endpoints already seen.

    ``entries_per_endpoint``: instead of C-core's ring of about ``min_ring_size`` entries in all (which
    rescales every endpoint's share of entries when the set changes), that many entries per endpoint of the
    smallest weight, whatever the size of the set: an endpoint leaving then takes only its own entries, so
    only its keys (about 1/N) move, at the price of another mapping than stock grpc's."""
    weights = [e.weight if e.weight > 0 else 1 for e in endpoints]
    total = sum(weights)
    normalized = [w / total for w in weights]
    least = min(normalized)
    if entries_per_endpoint is None:
        scale = min(math.ceil(least * min_ring_size) / least, float(max_ring_size))
    else:
        scale = entries_per_endpoint / least
    cache = {} if point_hashes is None else point_hashes
    entries: list[tuple[int, int]] = []
    current = target = 0.0
    for index, (ep, share) in enumerate(zip(endpoints, normalized, strict=True)):
        target += scale * share
        known = cache.get(ep.address)
        if known is None:
            known = cache[ep.address] = []
        count = 0
        while current < target:
            if count == len(known):
                known.append(xxh64(f"{ep.address}_{count}".encode()))
            entries.append((known[count], index))
            count += 1
            current += 1.0
    entries.sort(key=lambda entry: entry[0])
    return Ring(
        [h for h, _ in entries],
        [endpoints[i] for _, i in entries],
        tuple((e.address, e.weight) for e in endpoints),
    )


class RingHash(RoutingPolicy):
    """Consistent hashing on the call's ``hash_key`` metadata value (gRFC A42's ring, see the module): the
    same value reaches the same endpoint from every client with the same set, and when one of N endpoints
    leaves only its keys and about as many more move (A42 rescales the ring), unless
    ``entries_per_endpoint`` is set: then only its keys move, on a ring of this library's own. Calls without
    the value get a random ring position. Watch mode only (per_call: the lookaside's Resolve knows no
    keys)."""

    name = "ring_hash"

    def __init__(
        self,
        hash_key: str | None = None,
        min_ring_size: int = MIN_RING_SIZE,
        max_ring_size: int = MAX_RING_SIZE,
        seed: int | None = None,
        entries_per_endpoint: int | None = None,
    ) -> None:
        if not 1 <= min_ring_size <= max_ring_size <= RING_SIZE_LIMIT:
            raise ValueError(
                f"ring sizes must satisfy 1 <= min_ring_size <= max_ring_size <= {RING_SIZE_LIMIT}, got "
                f"{min_ring_size!r}, {max_ring_size!r}"
            )
        if entries_per_endpoint is not None and not 1 <= entries_per_endpoint <= RING_SIZE_LIMIT:
            raise ValueError(
                f"entries_per_endpoint must be None (grpc's ring) or 1..{RING_SIZE_LIMIT}, "
                f"got {entries_per_endpoint!r}"
            )
        self.hash_key = hash_key
        self.min_ring_size = min_ring_size
        self.max_ring_size = max_ring_size
        #: None: C-core's ring (the same pod as stock grpc for every key); a number: that many entries per
        #: endpoint (only a leaving endpoint's keys move; see :func:`build_ring`)
        self.entries_per_endpoint = entries_per_endpoint
        self._random = random.Random(seed).getrandbits
        #: (the set the ring is for, the ring); swapped whole, read without a lock
        self._state: tuple[Sequence[Endpoint] | None, Ring | None] = (None, None)
        #: (an eligible subset of the ring's set, its addresses), for the walk past ejected endpoints
        self._eligible: tuple[Sequence[Endpoint] | None, frozenset[str]] = (None, frozenset())
        self._full: Callable[[], Sequence[Endpoint]] | None = None
        self._points: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def follow(self, full: Callable[[], Sequence[Endpoint]]) -> None:
        """Build the ring over ``full()`` (the whole known set) rather than the eligible endpoints a pick is
        given, so that an ejected endpoint is walked past instead of reshaping the ring."""
        self._full = full

    def ring(self, endpoints: Sequence[Endpoint]) -> Ring:
        """The ring for this set (rebuilt only when its addresses or weights change)."""
        state = self._state
        if state[0] is endpoints and state[1] is not None:
            return state[1]
        key = tuple((e.address, e.weight) for e in endpoints)
        with self._lock:
            ring = self._state[1]
            if ring is None or ring.key != key:
                current = {e.address for e in endpoints}
                points = {a: p for a, p in self._points.items() if a in current}
                ring = build_ring(
                    endpoints, self.min_ring_size, self.max_ring_size, points, self.entries_per_endpoint
                )
                self._points = points
            self._state = (endpoints, ring)
        return ring

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        """A call without the key: a random ring position (as grpc's random hash)."""
        return self.pick_hashed(endpoints, None)

    def pick_hashed(self, endpoints: Sequence[Endpoint], request_hash: int | None) -> Endpoint:
        full = self._full() if self._full is not None else endpoints
        if not full:
            full = endpoints
        ring = self.ring(full)
        owners = ring.owners
        i = ring.index(self._random(64) if request_hash is None else request_hash)
        ep = owners[i]
        if endpoints is full or len(endpoints) == len(full):
            return ep
        eligible = self._eligible
        if eligible[0] is not endpoints:
            eligible = self._eligible = (endpoints, frozenset(e.address for e in endpoints))
        allowed = eligible[1]
        if ep.address in allowed:
            return ep
        n = len(owners)
        for j in range(i + 1, i + n):  # A42's failover: the next entry of an endpoint that is not ejected
            ep = owners[j % n]
            if ep.address in allowed:
                return ep
        return endpoints[0]  # none of the ring's endpoints is eligible (a set change raced this pick)
