"""How a rotation follows ``Endpoint.weight``: one earliest-deadline-first schedule, shared by the client's
``weighted`` policy and the server's WEIGHTED router (public: ``lookaside_grpc.protocol.weighted_schedule``),
so both sides turn the same weights into the same spread."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

#: Weights are scaled so the largest is this many schedule slots (about 1.5 % resolution).
WEIGHT_RESOLUTION = 64
#: The longest precomputed schedule.
MAX_SCHEDULE = 8192


def normalized_weights(weights: Sequence[int], resolution: int = WEIGHT_RESOLUTION) -> list[int]:
    """Small positive integers proportional to ``weights``: 0 (unknown) counts as the mean of the known
    ones, all unknown means equal; the largest becomes ``resolution``, none drops below 1."""
    known = [w for w in weights if w > 0]
    if not known:
        return [1] * len(weights)
    mean = sum(known) / len(known)
    full = [w if w > 0 else mean for w in weights]
    top = max(full)
    scale = resolution / top
    while True:
        out = [max(1, round(w * scale)) for w in full]
        if sum(out) <= MAX_SCHEDULE or scale * top <= 1:
            return out
        scale /= 2


def weighted_schedule(weights: Sequence[int]) -> list[int]:
    """Indexes in earliest-deadline-first order: index ``i`` appears in proportion to ``weights[i]``,
    interleaved smoothly (EDF over deadlines ``(k + 0.5) / w``); one full cycle. Weights are normalized
    with :func:`normalized_weights` first."""
    ws = normalized_weights(weights)
    if len(set(ws)) == 1:
        return list(range(len(ws)))
    heap = [(0.5 / w, i) for i, w in enumerate(ws)]
    heapq.heapify(heap)
    out: list[int] = []
    for _ in range(sum(ws)):
        d, i = heapq.heappop(heap)
        out.append(i)
        heapq.heappush(heap, (d + 1.0 / ws[i], i))
    return out
