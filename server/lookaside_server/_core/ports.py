"""Backend selection: port choice, eligibility (ready, else serving-and-terminating) and the pick strategies.

Round robin keeps ONE counter per (target, port) shared by every client; it is never reset when the
endpoint set changes, so the rotation carries on over the new set.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lookaside_grpc.protocol import InvalidTarget, canonical_port
from lookaside_server._core.model import BackendEndpoint, Endpoints, Target

#: Most picks one Resolve may ask for.
MAX_COUNT = 1000


class UnknownPort(LookupError):
    """The requested port (name or number) is not a port of the target."""

    def __init__(self, port: str, known: Sequence[str], hint: str = "") -> None:
        message = f"port {port!r} is not a port of the target (ports: {', '.join(known) or 'none'})"
        super().__init__(f"{message}; {hint}" if hint else message)
        self.port = port
        self.known = tuple(known)


def port_keys(endpoints: Endpoints) -> list[str]:
    """The target's ports in order of first appearance, for messages: a name with its Service port number
    (``grpc (80)``) where both are known, else the name or the number."""
    out = []
    for e in endpoints:
        key = f"{e.port_name} ({e.service_port})" if e.port_name and e.service_port else e.port_key
        out.append(key)
    return list(dict.fromkeys(out))


def _target_port_hint(endpoints: Endpoints, number: int) -> str:
    """Why ``number`` is refused when it is the target port of a Service port: which one to ask for."""
    owners = dict.fromkeys(
        (e.service_port, e.port_name) for e in endpoints if e.port == number and e.service_port
    )
    if not owners:
        return ""
    owners_text = ", ".join(f"{sp} {name!r}" if name else str(sp) for sp, name in owners)
    asks = ", ".join(f"{sp} or {name!r}" if name else str(sp) for sp, name in owners)
    return (
        f"{number} is the pods' target port of Service port {owners_text}: a number means the Service "
        f"port (as inside the cluster), ask for {asks}"
    )


def select_port(endpoints: Endpoints, port: str) -> tuple[str, Endpoints]:
    """Endpoints serving the requested port and the canonical key of that choice (for the rotation).

    A port is identified as in a Kubernetes Service: by its name, or by the Service port's number
    (``spec.ports[].port``, each endpoint's :attr:`~BackendEndpoint.number`), mapped to every endpoint's own
    port (the target port, which a named ``targetPort`` can make differ per pod). "" means the port named
    like the first endpoint's (unnamed counts as a name); digits select by Service port number
    (``Target``'s canonical port: leading zeros do not matter), anything else by name. An endpoint with no
    known Service port (a static file entry without ``service_port``) is numbered by its own port. A number
    that is only a target port is refused, with a hint naming its Service port: one number has one meaning,
    as for kube-proxy and ``kubectl port-forward svc/...``. Raises UnknownPort, also for a port no Target
    could name.
    """
    if not endpoints:
        return port, ()
    if port == "":
        name = endpoints[0].port_name
        return name, tuple(e for e in endpoints if e.port_name == name)
    try:
        port = canonical_port(port)
    except InvalidTarget:
        raise UnknownPort(port[:80], port_keys(endpoints)) from None
    if port.isdigit():
        number = int(port)
        chosen = tuple(e for e in endpoints if e.number == number)
        if not chosen:
            raise UnknownPort(port, port_keys(endpoints), _target_port_hint(endpoints, number))
        names = {e.port_name for e in chosen}
        key = names.pop() if len(names) == 1 and "" not in names else str(number)
    else:
        key = port
        chosen = tuple(e for e in endpoints if e.port_name == port)
    if not chosen:
        raise UnknownPort(port, port_keys(endpoints))
    return key, chosen


def eligible(endpoints: Endpoints) -> Endpoints:
    """Endpoints fit for new picks: the ready ones, else (none ready) the serving-and-terminating ones."""
    ready = tuple(e for e in endpoints if e.ready and not e.terminating)
    if ready:
        return ready
    return tuple(e for e in endpoints if e.serving and e.terminating)


class RoundRobin:
    """Shared rotation counters per (target, port key); a counter only ever grows."""

    def __init__(self) -> None:
        self._counters: dict[tuple[Target, str], int] = {}

    def take(self, target: Target, port_key: str, count: int) -> int:
        """Reserve ``count`` consecutive positions, return the first; atomic on the loop (no await)."""
        key = (target, port_key)
        start = self._counters.get(key, 0)
        self._counters[key] = start + count
        return start

    def pick(self, target: Target, port_key: str, candidates: Endpoints, count: int) -> list[BackendEndpoint]:
        """The next ``count`` picks of the rotation over ``candidates``."""
        start = self.take(target, port_key, count)
        n = len(candidates)
        return [candidates[(start + i) % n] for i in range(count)]

    def forget(self, target: Target) -> None:
        """Drop the counters of a target (only when it is no longer served at all)."""
        for key in [k for k in self._counters if k[0] == target]:
            del self._counters[key]


def pick_random(candidates: Endpoints, count: int, rng: random.Random | None = None) -> list[BackendEndpoint]:
    """``count`` independent uniform picks."""
    choice = (rng or random).choice
    return [choice(candidates) for _ in range(count)]
