"""The xDS control plane (ADS) for stock gRPC ``xds:///`` clients; needs the optional ``xds-protos`` package
(only :mod:`.stream` and :mod:`.resources` import it)."""

from __future__ import annotations

from collections.abc import Iterable

#: Most resource names one ADS stream may subscribe to by default (``--xds-max-names``/``LB_XDS_MAX_NAMES``).
MAX_NAMES = 256
#: Most distinct client zones served a zone-aware ClusterLoadAssignment at once (``--xds-max-zones``).
MAX_ZONES = 64
#: ``--xds-lb-policy`` values: gRPC's round_robin (the default) or client_side_weighted_round_robin.
ROUND_ROBIN = "round_robin"
WRR = "wrr"
LB_POLICIES = (ROUND_ROBIN, WRR)
#: The ``--xds-hash-header`` key that applies to every target without a header of its own.
HASH_ALL = "*"


def check_hash_header(header: str) -> str:
    """``header`` if gRPC can hash on it: a lowercase HTTP header name, not a pseudo-header (``:path``), not
    binary (``-bin``, which gRPC skips when hashing) and not ``grpc-`` (reserved); else ValueError."""
    if (
        not header
        or header != header.lower()
        or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in header)
    ):
        raise ValueError(f"hash header {header!r}: expected a lowercase header name (letters, digits, -_.)")
    if header.endswith("-bin") or header.startswith("grpc-"):
        raise ValueError(f"hash header {header!r}: gRPC does not hash on binary (-bin) or grpc- headers")
    return header


def parse_hash_headers(items: Iterable[str]) -> dict[str, str]:
    """``--xds-hash-header`` values (each repeatable or comma-separated): ``HEADER`` for every target or
    ``namespace/service=HEADER`` for one, as :attr:`XdsOptions.hash_headers`; ValueError for a bad one."""
    out: dict[str, str] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, sep, header = part.rpartition("=")
            key = key.strip() if sep else HASH_ALL
            ns, _, svc = key.partition("/")
            if key != HASH_ALL and (not ns or not svc or "/" in svc):
                raise ValueError(f"--xds-hash-header {part!r}: expected HEADER or namespace/service=HEADER")
            if key in out and out[key] != header.strip():
                raise ValueError(f"--xds-hash-header: two headers for {key!r}: {out[key]!r} and {header!r}")
            out[key] = check_hash_header(header.strip())
    return out
