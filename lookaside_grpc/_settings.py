"""The one home of the client's options: the resolution modes (:class:`Watch`, :class:`PerCall`), the
keyword options every flavour accepts (:class:`ClientOptions`) and :class:`Settings`, the frozen value a
balancer is built from and shared by (channels and interceptors with equal settings share one balancer).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias, TypedDict

import grpc

from lookaside_grpc._budget import DEFAULT_RETRY_BUDGET, RetryBudget
from lookaside_grpc._health import AdaptiveThrottle
from lookaside_grpc._policies import POLICIES, SLOW_START_WINDOW, RoutingPolicy
from lookaside_grpc._target import Target

#: Where the lookaside is when neither ``lookaside=`` nor ``LOOKASIDE_ADDR`` says otherwise.
FALLBACK_LOOKASIDE = "127.0.0.1:50055"
#: The environment variable naming the default lookaside address (as the ``lookaside`` CLI reads it).
LOOKASIDE_ADDR_ENV = "LOOKASIDE_ADDR"
#: How long the last endpoint set (or the last picks) keeps serving after the lookaside stopped confirming
#: it: rides out a lookaside restart while bounding the risk of calling pod IPs reused by other pods.
DEFAULT_MAX_STALENESS: float | None = 300.0
#: HTTP/2 keepalive ping interval on the lookaside channel (seconds); the lookaside server accepts pings
#: every 10 s (``--min-ping-interval``). A silent lookaside is noticed within interval + timeout.
DEFAULT_LOOKASIDE_KEEPALIVE: float | None = 20.0
#: How long a keepalive ping may stay unanswered before the lookaside connection counts as dead.
KEEPALIVE_TIMEOUT = 10.0

#: A channel argument value as grpc takes it.
OptionValue: TypeAlias = str | int | bytes | bool | float
Options: TypeAlias = Sequence[tuple[str, OptionValue]]


def default_lookaside() -> str:
    """``$LOOKASIDE_ADDR`` if set, else ``127.0.0.1:50055``."""
    return os.environ.get(LOOKASIDE_ADDR_ENV) or FALLBACK_LOOKASIDE


@dataclass(frozen=True, slots=True)
class Watch:
    """Watch mode (the default): one background ``Watch`` stream per target keeps the endpoint set; every
    call picks locally with the policy, at no extra round trip."""

    def __str__(self) -> str:
        return "watch"


@dataclass(frozen=True, slots=True)
class PerCall:
    """Per-call mode: one ``Resolve`` per call, so the lookaside's shared rotation decides every pick.

    ``batch`` picks per Resolve amortise it; ``pick_cache_ttl`` > 0 reuses one Resolve's picks for that
    many seconds (as RLS caches targets); ``throttle`` rejects Resolves locally while the lookaside keeps
    failing (adaptive throttling, as RLS), rotating over the last known picks instead.
    """

    batch: int = 1
    pick_cache_ttl: float = 0.0
    throttle: bool | AdaptiveThrottle = True

    def __post_init__(self) -> None:
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"PerCall(batch=...) must be an int >= 1, got {self.batch!r}")
        if not self.pick_cache_ttl >= 0:
            raise ValueError(f"PerCall(pick_cache_ttl=...) must be >= 0, got {self.pick_cache_ttl!r}")

    def __str__(self) -> str:
        return "per_call"


@dataclass(frozen=True, slots=True)
class Xds:
    """xDS mode (factories only): ``channel()``/``aio.channel()`` return grpc's own ``xds:///<target>``
    channel, bootstrapped to the lookaside's xDS control plane, so C-core resolves and picks (round robin over
    the lookaside's endpoints); a call does no Python work beyond grpc's own. No Python policies, counters,
    ``max_staleness`` or retries on another endpoint; one lookaside address per process (grpc reads one xDS
    bootstrap per process)."""

    def __str__(self) -> str:
        return "xds"


Mode: TypeAlias = Watch | PerCall
#: Shorthands accepted for ``mode=``: ``"watch"`` = ``Watch()``, ``"per_call"`` = ``PerCall()``.
ModeName: TypeAlias = Literal["watch", "per_call"]
WATCH: ModeName = "watch"
PER_CALL: ModeName = "per_call"
#: ``mode="xds"`` = ``Xds()`` (``channel()``/``aio.channel()`` only).
XdsModeName: TypeAlias = Literal["xds"]
XDS: XdsModeName = "xds"


def is_xds(mode: object) -> bool:
    """Whether ``mode=`` asks for xds mode (``Xds()`` or ``"xds"``)."""
    return isinstance(mode, Xds) or mode == XDS


class ClientOptions(TypedDict, total=False):
    """The keyword options shared by ``channel()``, ``aio.channel()`` and both interceptors (declared once).

    (Each flavour also takes ``lookaside``: the lookaside address, default ``$LOOKASIDE_ADDR``, else
    ``127.0.0.1:50055``.) ``mode``: :class:`Watch` (default) or :class:`PerCall`; ``policy``:
    ``"round_robin"`` (default), ``"random"``, ``"least_request"``, ``"peak_ewma"``, ``"weighted"`` or a
    :class:`RoutingPolicy`;
    ``credentials`` / ``options``: of the per-backend channels; ``lookaside_credentials``: of the lookaside
    channel (None = insecure); ``tls_server_name``: the name backends' certificates are verified against
    (default ``<service>.<namespace>.svc``; ``""`` = the pod IP); ``max_staleness``: seconds the last set
    keeps serving without word from the lookaside (None = forever); ``lookaside_keepalive``: keepalive
    ping interval on the lookaside channel (None = off); ``retry_budget``: a :class:`RetryBudget` limiting
    the retries to a fraction of the calls (default 20 % plus 10 a second; None = no limit); ``slow_start``:
    seconds over which an endpoint joining the set ramps up to a full share (``True`` = 30, as Envoy's
    window; default None = a full share at once, Envoy's slow start is opt-in too); ``zone``: the client's
    zone for zone-aware routing (default ``$LOOKASIDE_ZONE``; ``""`` = ignore zones); ``hash_key``: the
    call metadata key that ``policy="ring_hash"`` hashes (required there, refused with any other policy;
    lowercase, not ``-bin``).
    """

    mode: Mode | ModeName
    policy: str | RoutingPolicy
    credentials: grpc.ChannelCredentials | None
    options: Options
    lookaside_credentials: grpc.ChannelCredentials | None
    tls_server_name: str | None
    max_staleness: float | None
    lookaside_keepalive: float | None
    retry_budget: RetryBudget | None
    slow_start: float | bool | None
    zone: str | None
    hash_key: str | None


OPTION_NAMES = frozenset(ClientOptions.__annotations__)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a balancer is built from; equal settings share one balancer (the sharing key)."""

    target: Target
    lookaside: str
    mode: Mode
    policy: str | RoutingPolicy
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, OptionValue], ...]
    lookaside_credentials: grpc.ChannelCredentials | None
    tls_server_name: str | None
    max_staleness: float | None
    lookaside_keepalive: float | None
    retry_budget: RetryBudget | None = DEFAULT_RETRY_BUDGET
    slow_start: float | None = None
    zone: str = ""
    hash_key: str | None = None

    def for_target(self, target: Target) -> Settings:
        """The same settings for another target (interceptor routes)."""
        return _replace_target(self, target)

    def backend_options(self) -> tuple[tuple[str, OptionValue], ...]:
        """The options of the per-backend channels. Backends are dialled by pod IP, so with credentials the
        TLS server name (and :authority) is ``tls_server_name``, by default ``<service>.<namespace>.svc``;
        options the user set win; ``tls_server_name=""`` adds nothing (certificates must name the IP)."""
        return backend_options(self.target, self.credentials, self.options, self.tls_server_name)

    def lookaside_options(self) -> tuple[tuple[str, OptionValue], ...]:
        """The lookaside channel's options: quick reconnects and keepalive pings (a silent lookaside is
        noticed within ``lookaside_keepalive`` + :data:`KEEPALIVE_TIMEOUT` seconds)."""
        opts: list[tuple[str, OptionValue]] = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if self.lookaside_keepalive is not None:
            opts += [
                ("grpc.keepalive_time_ms", max(1, int(self.lookaside_keepalive * 1000))),
                ("grpc.keepalive_timeout_ms", int(min(KEEPALIVE_TIMEOUT, self.lookaside_keepalive) * 1000)),
                # grpcio 1.85 times pings out by this one, not by keepalive_timeout_ms (measured)
                ("grpc.http2.ping_timeout_ms", int(min(KEEPALIVE_TIMEOUT, self.lookaside_keepalive) * 1000)),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        return tuple(opts)

    def liveness_window(self) -> float:
        """How long before a broken Watch stream the lookaside may already have been silent: the last
        keepalive ping answered is at most this old (0 without keepalive)."""
        if self.lookaside_keepalive is None:
            return 0.0
        return self.lookaside_keepalive + min(KEEPALIVE_TIMEOUT, self.lookaside_keepalive)


def _replace_target(s: Settings, target: Target) -> Settings:
    return Settings(
        target,
        s.lookaside,
        s.mode,
        s.policy,
        s.credentials,
        s.options,
        s.lookaside_credentials,
        s.tls_server_name,
        s.max_staleness,
        s.lookaside_keepalive,
        s.retry_budget,
        s.slow_start,
        s.zone,
        s.hash_key,
    )


#: The channel arguments naming the TLS server (and the :authority) of backends dialled by IP.
TLS_NAME_OPTIONS = ("grpc.ssl_target_name_override", "grpc.default_authority")


def backend_options(
    target: Target,
    credentials: grpc.ChannelCredentials | None,
    options: Options,
    tls_server_name: str | None,
) -> tuple[tuple[str, OptionValue], ...]:
    """See :meth:`Settings.backend_options`."""
    opts = tuple(options)
    if credentials is None or tls_server_name == "":
        return opts
    name = tls_server_name or f"{target.service}.{target.namespace}.svc"
    given = {key for key, _ in opts}
    return opts + tuple((key, name) for key in TLS_NAME_OPTIONS if key not in given)


def parse_mode(mode: Mode | ModeName) -> Mode:
    """``Watch()``/``PerCall(...)`` as is; the names ``"watch"``/``"per_call"`` as their defaults."""
    if isinstance(mode, Watch | PerCall):
        return mode
    if is_xds(mode):
        raise ValueError(
            "mode='xds' builds grpc's own xds:/// channel: lookaside_grpc.channel()/aio.channel() only "
            "(interceptors balance with mode='watch' or 'per_call')"
        )
    if mode == WATCH:
        return Watch()
    if mode == PER_CALL:
        return PerCall()
    raise ValueError(f"unknown mode {mode!r}; expected Watch(), PerCall(...), 'watch' or 'per_call'")


def make_target(target: Target | str, namespace: str | None, port: str | int | None) -> Target:
    """The factories' target: a :class:`Target`, ``"service.namespace[:port]"``, or a bare Service name
    completed by ``namespace`` (default ``"default"``) and ``port``."""
    if isinstance(target, Target) or (isinstance(target, str) and ("." in target or ":" in target)):
        parsed = Target.parse(target)
        if namespace is not None and namespace != parsed.namespace:
            raise ValueError(f"namespace={namespace!r} contradicts target {str(parsed)!r}")
        if port is not None and str(port) != parsed.port:
            return parsed.with_port(port) if not parsed.port else _conflict(parsed, port)
        return parsed
    return Target(target, "default" if namespace is None else namespace, "" if port is None else port)


def _conflict(target: Target, port: str | int) -> Target:
    raise ValueError(f"port={port!r} contradicts target {str(target)!r}")


def make_settings(target: Target, lookaside: str | None, options: Mapping[str, object]) -> Settings:
    """Validate the shared keyword options (unknown ones are a TypeError, as for any function)."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    o: ClientOptions = options  # type: ignore[assignment]
    if lookaside is not None and not isinstance(lookaside, str):
        raise TypeError(f"lookaside must be an address string, got {lookaside!r}")
    lookaside = lookaside or default_lookaside()
    policy = o.get("policy", "round_robin")
    if isinstance(policy, str) and policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {sorted(POLICIES)}")
    if not isinstance(policy, str | RoutingPolicy):
        raise TypeError(f"policy must be a name or a RoutingPolicy, got {policy!r}")
    max_staleness = o.get("max_staleness", DEFAULT_MAX_STALENESS)
    if max_staleness is not None and not max_staleness > 0:
        raise ValueError(f"max_staleness must be > 0 or None, got {max_staleness!r}")
    keepalive = o.get("lookaside_keepalive", DEFAULT_LOOKASIDE_KEEPALIVE)
    if keepalive is not None and not keepalive > 0:
        raise ValueError(f"lookaside_keepalive must be > 0 or None, got {keepalive!r}")
    retry_budget = o.get("retry_budget", DEFAULT_RETRY_BUDGET)
    if retry_budget is not None and not isinstance(retry_budget, RetryBudget):
        raise TypeError(f"retry_budget must be a RetryBudget or None, got {retry_budget!r}")
    ramp = o.get("slow_start")
    slow_start = SLOW_START_WINDOW if ramp is True else None if ramp is False else ramp
    if slow_start is not None and not slow_start > 0:
        raise ValueError(f"slow_start must be seconds > 0, True or None, got {ramp!r}")
    zone = o.get("zone")
    explicit_zone = bool(zone)
    if zone is None:
        zone = os.environ.get("LOOKASIDE_ZONE", "")
    if not isinstance(zone, str):
        raise TypeError(f"zone must be a string, got {zone!r}")
    mode = parse_mode(o.get("mode", Watch()))
    hash_key = _hash_key(policy, o.get("hash_key"))
    if hash_key is not None or (isinstance(policy, RoutingPolicy) and policy.hash_key is not None):
        if isinstance(mode, PerCall):
            raise ValueError(
                "policy='ring_hash' needs mode='watch': in per_call mode the lookaside's Resolve picks, and "
                "it knows no call metadata"
            )
        if slow_start is not None:
            raise ValueError("slow_start does not apply to ring_hash (a ramp would move keys twice)")
        if explicit_zone:
            raise ValueError("zone does not apply to ring_hash (one ring spans every zone, as in grpc's A42)")
        zone = ""  # $LOOKASIDE_ZONE, set for the process's other channels: not for this one
    return Settings(
        target=target,
        lookaside=lookaside,
        mode=mode,
        policy=policy,
        credentials=o.get("credentials"),
        options=tuple((str(k), v) for k, v in o.get("options", ())),
        lookaside_credentials=o.get("lookaside_credentials"),
        tls_server_name=o.get("tls_server_name"),
        max_staleness=max_staleness,
        lookaside_keepalive=keepalive,
        retry_budget=retry_budget,
        slow_start=slow_start,
        zone=zone,
        hash_key=hash_key,
    )


#: What a ``hash_key`` may be: a gRPC metadata key (lowercase; grpc refuses others).
_HEADER_NAME = re.compile(r"[0-9a-z_.\-]+")


def _hash_key(policy: str | RoutingPolicy, key: object) -> str | None:
    """Validate ``hash_key`` against the policy: required by ``"ring_hash"``, refused by any other."""
    if key is None:
        if policy == "ring_hash":
            raise ValueError("policy='ring_hash' needs hash_key=<a call metadata key>, e.g. 'x-user-id'")
        return None
    if not isinstance(key, str):
        raise TypeError(f"hash_key must be a metadata key string, got {key!r}")
    if policy != "ring_hash":
        raise ValueError(f"hash_key applies to policy='ring_hash' only (policy is {policy!r})")
    if not _HEADER_NAME.fullmatch(key):
        raise ValueError(f"hash_key must be a lowercase gRPC metadata key ([0-9a-z_.-]), got {key!r}")
    if key.endswith("-bin") or key.startswith("grpc-"):
        raise ValueError(f"hash_key {key!r}: binary (-bin) and reserved (grpc-) keys are not hashed")
    return key
