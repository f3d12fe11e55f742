"""What the sync and aio interceptors share: routes (gRPC service -> Kubernetes target), method resolution
through the protobuf descriptor pool, and per-method routes bound to the shared balancers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory

from lookaside_grpc import _balancer
from lookaside_grpc._balancer import (
    DEFAULT_INIT_TIMEOUT,
    DEFAULT_MAX_STALENESS,
    Options,
    make_target,
)
from lookaside_grpc._health import AdaptiveThrottle
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._resolvers import WATCH, Mode
from lookaside_grpc._stats import NO_ROUTE, UNKNOWN_METHOD, Counters, Stats, track, untrack

log = logging.getLogger(__name__)

#: How long an intercepted call waits for a first endpoint set / Resolve before using the original channel
#: (capped at half the call's own timeout, so the fallback keeps time to complete).
DEFAULT_ROUTE_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class Target:
    """A Kubernetes Service port that calls of a gRPC service are balanced over."""

    service: str
    namespace: str = "default"
    port: str | int = ""

    @classmethod
    def parse(cls, value: Target | str) -> Target:
        """``Target`` as is, or ``"service[.namespace][:port]"``."""
        if isinstance(value, Target):
            return value
        if not isinstance(value, str) or not value:
            raise ValueError(f"a route target must be a Target or 'service.namespace[:port]', got {value!r}")
        name, _, port = value.partition(":")
        service, _, namespace = name.partition(".")
        return cls(service, namespace or "default", port)

    def __str__(self) -> str:
        return f"{self.service}.{self.namespace}" + (f":{self.port}" if self.port else "")


def method_classes(method: str) -> tuple[type[Any], type[Any]] | None:
    """Request and response classes of ``/pkg.Service/Method`` from the default descriptor pool, or None."""
    try:
        _, service, name = method.split("/")
        desc = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
        return (
            message_factory.GetMessageClass(desc.input_type),
            message_factory.GetMessageClass(desc.output_type),
        )
    except (KeyError, ValueError, TypeError):
        return None


class Route:
    """One method of a routed service: its balancer and, per call shape, the cached multicallable."""

    __slots__ = ("balancer", "resolver", "policy", "method", "request_class", "response_class", "multi")

    def __init__(self, balancer: Any, method: str, classes: tuple[type[Any], type[Any]]) -> None:
        self.balancer = balancer
        self.resolver = balancer.resolver
        self.policy = balancer.policy
        self.method = method
        self.request_class, self.response_class = classes
        self.multi: dict[str, Any] = {}


class RouterCore:
    """Routes and shared balancers of one interceptor; ``kind`` is "sync" or "aio"."""

    def __init__(
        self,
        kind: str,
        lookaside: str,
        routes: Mapping[str, Target | str],
        *,
        mode: Mode,
        policy: str | RoutingPolicy,
        batch: int,
        route_wait: float,
        settings: dict[str, Any],
        balancer_factory: Callable[..., Any],
        loop_key: Callable[[], object],
    ) -> None:
        self.kind = kind
        self.lookaside = lookaside
        self.routes = {svc: Target.parse(t) for svc, t in routes.items()}
        self.targets = {
            svc: make_target(t.service, t.namespace, t.port, lookaside, mode, batch)
            for svc, t in self.routes.items()
        }
        self.mode = mode
        self.policy = policy
        self.route_wait = route_wait
        self.settings = settings
        self._factory = balancer_factory
        self._loop_key = loop_key
        self.counters = Counters()
        #: (loop key, method) -> Route, or the fallback reason (str) for methods that are not routed
        self._methods: dict[tuple[object, str], Route | str] = {}
        self._balancers: dict[tuple[object, str], Any] = {}
        self._lock = threading.Lock()
        self._closed = False
        track(self)

    def route(self, method: str | bytes) -> Route | None:
        """The route of ``method``, or None (counted as a fallback) to use the original channel."""
        if isinstance(method, bytes):
            method = method.decode()
        lk = self._loop_key()
        r = self._methods.get((lk, method))
        if r is None:
            r = self._build(lk, method)
        if isinstance(r, str):
            self.counters.fallback(r)
            return None
        return r

    def _build(self, lk: object, method: str) -> Route | str:
        service = method.split("/")[1] if method.count("/") == 2 else ""
        target = self.targets.get(service)
        if target is None:
            r: Route | str = NO_ROUTE
        else:
            classes = method_classes(method)
            if classes is None:
                log.info("%s is not in the protobuf descriptor pool: using the original channel", method)
                r = UNKNOWN_METHOD
            else:
                r = Route(self._balancer(lk, target), method, classes)
        with self._lock:
            if self._closed:
                raise ValueError("lookaside interceptor is closed")
            return self._methods.setdefault((lk, method), r)

    def _balancer(self, lk: object, target: Any) -> Any:
        with self._lock:
            b = self._balancers.get((lk, str(target)))
            if b is None:
                b = self._balancers[(lk, str(target))] = _balancer.shared(
                    self.kind, self._factory, target, self.mode, self.policy, self.settings, lk
                )
            return b

    def wait_for(self, timeout: float | None) -> float:
        """How long a call may wait for a pick before falling back."""
        return self.route_wait if timeout is None else min(self.route_wait, timeout * 0.5)

    def release_all(self) -> list[Any]:
        """Drop this interceptor's references; return the balancers to close (last users)."""
        with self._lock:
            self._closed = True
            balancers = list(self._balancers.values())
            self._balancers.clear()
            self._methods.clear()
        untrack(self)
        return [b for b in balancers if _balancer.release(b)]

    def stats(self) -> Stats:
        with self._lock:
            balancers = list(self._balancers.values())
        out = self.counters.snapshot()
        for b in balancers:
            out.merge(b.stats())
        return out

    def _stats_items(self) -> Iterable[tuple[str, Stats]]:
        # the balancers are tracked on their own; here only the interceptor's own fallbacks
        return [("interceptor", self.counters.snapshot())]


def _no_loop() -> object:
    return None


class InterceptorCommon:
    """What the sync and aio ``LookasideInterceptor`` share: their arguments, the core built from them, the
    routes and the counters. Subclasses name their kind, balancer class and per-loop key."""

    _kind = "sync"
    _balancer_factory: Callable[..., Any]
    _loop_key: Callable[[], object] = staticmethod(_no_loop)

    def __init__(
        self,
        lookaside: str = "127.0.0.1:50055",
        routes: Mapping[str, Target | str] | None = None,
        *,
        mode: Mode = WATCH,
        policy: str | RoutingPolicy = "round_robin",
        credentials: grpc.ChannelCredentials | None = None,
        options: Options = (),
        lookaside_credentials: grpc.ChannelCredentials | None = None,
        batch: int = 1,
        route_wait: float = DEFAULT_ROUTE_WAIT,
        max_staleness: float | None = DEFAULT_MAX_STALENESS,
        pick_cache_ttl: float = 0.0,
        throttle: bool | AdaptiveThrottle = True,
    ) -> None:
        settings = _balancer.settings(
            credentials=credentials,
            options=options,
            lookaside_credentials=lookaside_credentials,
            init_timeout=DEFAULT_INIT_TIMEOUT,
            max_staleness=max_staleness,
            pick_cache_ttl=pick_cache_ttl,
            throttle=throttle,
        )
        self._core = RouterCore(
            self._kind,
            lookaside,
            routes or {},
            mode=mode,
            policy=policy,
            batch=batch,
            route_wait=route_wait,
            settings=settings,
            balancer_factory=self._balancer_factory,
            loop_key=self._loop_key,
        )

    @property
    def routes(self) -> dict[str, Target]:
        """gRPC service name -> target."""
        return dict(self._core.routes)

    def stats(self) -> Stats:
        """Counters: the interceptor's own fallbacks plus those of the balancers it uses."""
        return self._core.stats()
