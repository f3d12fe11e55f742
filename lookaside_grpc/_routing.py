"""What the sync and aio interceptors share: routes (gRPC service -> :class:`Target`), method resolution
through the protobuf descriptor pool, per-method routes bound to shared balancers, and the pick rule
(wait at most ``route_wait`` on a cold start, fall back at once while the lookaside is failing)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Generic, TypeVar

import grpc
import grpc.aio
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

from lookaside_grpc import _balancer
from lookaside_grpc._balancer import AioBalancer, Balancer, Lease
from lookaside_grpc._calls._engine import Method
from lookaside_grpc._settings import Settings, make_settings
from lookaside_grpc._stats import NO_ROUTE, UNKNOWN_METHOD, UNRESOLVED_ROUTE, Counters, Stats, track, untrack
from lookaside_grpc._target import Target

log = logging.getLogger(__name__)

#: How long an intercepted call waits for a first endpoint set / Resolve before using the original channel
#: (capped at half the call's own timeout, so the fallback keeps time to complete).
DEFAULT_ROUTE_WAIT = 1.0

B = TypeVar("B", Balancer, AioBalancer)
MessageClass = type[Message]


def _service(name: str) -> object | None:
    try:
        return descriptor_pool.Default().FindServiceByName(name)
    except KeyError:
        return None


def find_service(name: str) -> object | None:
    """The service descriptor of ``name`` from the default pool. A ``.proto`` holding only the service (its
    messages imported from other files) is registered by its ``_pb2`` module, which the generated
    ``_pb2_grpc`` module does not import: the ``_pb2`` siblings of loaded ``_pb2_grpc`` modules are imported
    once to find it."""
    found = _service(name)
    if found is not None:
        return found
    for module in [m for m in list(sys.modules) if m.endswith("_pb2_grpc")]:
        sibling = module[: -len("_grpc")]
        if sibling in sys.modules:
            continue
        try:
            importlib.import_module(sibling)
        except Exception:  # no such module, or it fails to import: not ours to fix
            continue
        found = _service(name)
        if found is not None:
            return found
    return None


def method_classes(method: str) -> tuple[MessageClass, MessageClass] | None:
    """Request and response classes of ``/pkg.Service/Method`` from the descriptor pool, or None."""
    try:
        _, service, name = method.split("/")
    except ValueError:
        return None
    desc = find_service(service)
    if desc is None:
        return None
    md = getattr(desc, "methods_by_name", {}).get(name)
    if md is None:
        return None
    return message_factory.GetMessageClass(md.input_type), message_factory.GetMessageClass(md.output_type)


class Route(Generic[B]):
    """One method of a routed service on one balancer: its classes and, per call shape, the engine's
    :class:`Method` (made on first use)."""

    __slots__ = ("balancer", "method", "request_class", "response_class", "methods")

    def __init__(self, balancer: B, method: str, classes: tuple[MessageClass, MessageClass]) -> None:
        self.balancer: B = balancer
        self.method = method
        self.request_class, self.response_class = classes
        self.methods: dict[str, Method[grpc.Channel, object] | Method[grpc.aio.Channel, object]] = {}


def serialize(message: Message) -> bytes:
    return message.SerializeToString()


class RouterCore(Generic[B]):
    """Routes and leased balancers of one interceptor; ``lease`` makes a balancer's lease for settings."""

    def __init__(
        self,
        lookaside: str | None,
        routes: Mapping[str, Target | str],
        options: Mapping[str, object],
        *,
        route_wait: float,
        strict: bool,
        lease: Callable[[Settings], Lease[B]],
        loop_key: Callable[[], object],
    ) -> None:
        if not isinstance(routes, Mapping):
            raise TypeError(f"routes must map gRPC service names to targets, got {routes!r}")
        self.routes = {svc: Target.parse(t) for svc, t in routes.items()}
        self.settings = {svc: make_settings(t, lookaside, options) for svc, t in self.routes.items()}
        if not self.routes:  # still validate the options
            make_settings(Target("x", "x"), lookaside, options)
        if not route_wait >= 0:
            raise ValueError(f"route_wait must be >= 0, got {route_wait!r}")
        self.route_wait = route_wait
        self._lease: Callable[[Settings], Lease[B]] = lease
        self._loop_key = loop_key
        self.counters = Counters()
        #: (loop key, method) -> Route, or the fallback reason (str) for methods that are not routed
        self._methods: dict[tuple[object, str], Route[B] | str] = {}
        self._leases: dict[tuple[object, Target], Lease[B]] = {}
        self._lock = threading.Lock()
        self.closed = False
        unresolved = [svc for svc in self.routes if find_service(svc) is None]
        for svc in unresolved:
            self.counters.fallback(UNRESOLVED_ROUTE)
            log.warning(
                "route %r: no such gRPC service in the protobuf descriptor pool (is its _pb2 module "
                "imported?); its calls will use the original channel",
                svc,
            )
        if strict and unresolved:
            raise ValueError(f"routes name gRPC services unknown to the descriptor pool: {unresolved}")
        track(self)

    def route(self, method: str | bytes) -> Route[B] | None:
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

    def route_quiet(self, method: str) -> Route[B] | None:
        """The route of ``method`` if it is already known to be routed, else None -- counting nothing: the
        caller then takes the path of :meth:`route` (which builds, counts and raises when closed)."""
        r = self._methods.get((self._loop_key(), method))
        return r if type(r) is Route else None

    def _build(self, lk: object, method: str) -> Route[B] | str:
        service = method.split("/")[1] if method.count("/") == 2 else ""
        target = self.routes.get(service)
        r: Route[B] | str
        if target is None:
            r = NO_ROUTE
        else:
            classes = method_classes(method)
            if classes is None:
                log.info("%s is not in the protobuf descriptor pool: using the original channel", method)
                r = UNKNOWN_METHOD
            else:
                r = Route(self._balancer(lk, service, target), method, classes)
        with self._lock:
            if self.closed:
                raise ValueError("lookaside interceptor is closed")
            return self._methods.setdefault((lk, method), r)

    def _balancer(self, lk: object, service: str, target: Target) -> B:
        with self._lock:
            if self.closed:
                raise ValueError("lookaside interceptor is closed")
            lease = self._leases.get((lk, target))
            if lease is None:
                lease = self._leases[(lk, target)] = self._lease(self.settings[service])
            return lease.balancer

    def wait_for(self, timeout: float | None) -> float:
        """How long a call may wait for a pick before falling back."""
        return self.route_wait if timeout is None else min(self.route_wait, timeout * 0.5)

    def release_all(self) -> list[Lease[B]]:
        """Drop this interceptor's leases; return those whose balancer the caller must close."""
        return [lease for _, lease in self._release()]

    def _release(self) -> list[tuple[object, Lease[B]]]:
        with self._lock:
            self.closed = True
            leases = [(lk, lease) for (lk, _), lease in self._leases.items()]
            self._leases.clear()
            self._methods.clear()
        untrack(self)
        return [(lk, lease) for lk, lease in leases if lease.release()]

    def release_in_gc(self) -> None:
        """The interceptor was garbage collected without ``close()``: close its last-held balancers without
        blocking (sync: in a thread; aio: as a task in the balancer's loop, if it still runs)."""
        for lk, lease in self._release():
            balancer = lease.balancer
            if isinstance(balancer, Balancer):
                threading.Thread(target=balancer.close, name="lookaside-close", daemon=True).start()
            elif isinstance(lk, asyncio.AbstractEventLoop):
                _balancer.close_in_loop(balancer, lk)

    def stats(self) -> Stats:
        with self._lock:
            balancers = [lease.balancer for lease in self._leases.values()]
        out = self.counters.snapshot()
        for b in balancers:
            out.merge(b.stats())
        return out

    def _stats_items(self) -> Iterable[tuple[str, Stats]]:
        # the balancers are tracked on their own; here only the interceptor's own fallbacks
        return [("interceptor", self.counters.snapshot())]


def lease_sync(settings: Settings) -> Lease[Balancer]:
    return _balancer.lease_sync(settings)


def lease_aio(settings: Settings) -> Lease[AioBalancer]:
    return _balancer.lease_aio(settings, share=True)
