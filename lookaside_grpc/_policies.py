"""Routing policies: choose one endpoint of a set for a call; small and swappable."""

from __future__ import annotations

import abc
import itertools
import random
from collections.abc import Sequence
from typing import ClassVar

from lookaside_grpc import protocol
from lookaside_grpc._endpoints import Endpoint


class RoutingPolicy(abc.ABC):
    """Picks an endpoint from a non-empty set; must be thread-safe and cheap (it runs on every call)."""

    #: The lookaside ``Request.RouterType`` sent in ``per_call`` mode, where the lookaside picks.
    router_type: ClassVar[int] = protocol.ROUNDROBIN
    #: The name this policy is known by in ``channel(policy=...)``.
    name: ClassVar[str] = ""

    @abc.abstractmethod
    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        """Return one of ``endpoints`` (never empty)."""


class RoundRobin(RoutingPolicy):
    """Cycles through the set in order; lock-free (``next()`` on an itertools.count is atomic)."""

    router_type = protocol.ROUNDROBIN
    name = "round_robin"

    def __init__(self) -> None:
        self._next = itertools.count().__next__

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        return endpoints[self._next() % len(endpoints)]


class Random(RoutingPolicy):
    """Picks uniformly at random."""

    router_type = protocol.RANDOM
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._choice = random.Random(seed).choice

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        return self._choice(endpoints)


POLICIES: dict[str, type[RoutingPolicy]] = {"round_robin": RoundRobin, "random": Random}


def resolve_policy(policy: str | RoutingPolicy) -> RoutingPolicy:
    """Turn a policy name ("round_robin", "random") or instance into an instance."""
    if isinstance(policy, RoutingPolicy):
        return policy
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(f"unknown policy {policy!r}; expected one of {sorted(POLICIES)}") from None
