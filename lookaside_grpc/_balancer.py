"""The per-target core: resolver + policy + channel pool + ejection + counters, shared by channels and
interceptors (one implementation): a balancer is created per (target, lookaside, mode, policy, port,
credentials, options...) and reused through ``acquire``/``release`` with reference counting."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from lookaside_grpc import protocol
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._health import AdaptiveThrottle, Ejector
from lookaside_grpc._policies import RoutingPolicy, resolve_policy
from lookaside_grpc._pool import ChannelPool
from lookaside_grpc._resolvers import (
    MODES,
    WATCH,
    AioPerCallResolver,
    AioResolver,
    AioWatchResolver,
    Mode,
    PerCallResolver,
    SyncResolver,
    Target,
    WatchResolver,
)
from lookaside_grpc._stats import Counters, Stats, track, untrack

log = logging.getLogger(__name__)

#: How long a call without its own timeout waits for the first endpoint set (or a Resolve).
DEFAULT_INIT_TIMEOUT = 10.0
#: How long the last endpoint set (or the last picks) keeps serving after the lookaside stopped confirming it.
#: Five minutes rides out a lookaside restart or upgrade comfortably, while bounding the risk of sending calls
#: to pod IPs Kubernetes has since reused for other pods. None = forever.
DEFAULT_MAX_STALENESS: float | None = 300.0

#: How often a balancer reports its load (ReportLoad) when its policy is server-assisted; the lookaside's
#: answer may ask for another interval.
LOAD_REPORT_INTERVAL = 1.0
#: Most endpoints one load report lists (the lookaside ignores more).
MAX_REPORT_ENDPOINTS = 1000

#: The lookaside channel reconnects quickly after a lookaside restart (grpc's default backoff grows to 120 s).
LOOKASIDE_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

Options = Sequence[tuple[str, Any]]


def make_target(
    service: str, namespace: str, port: str | int, lookaside: str, mode: str, batch: int
) -> Target:
    """Validate the factory arguments shared by the sync and aio channels."""
    if not service:
        raise ValueError("service name must not be empty")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if batch < 1:
        raise ValueError("batch must be >= 1")
    return Target(service, namespace, str(port), lookaside, batch)


def _policy_key(policy: str | RoutingPolicy) -> object:
    return policy if isinstance(policy, str) else ("instance", id(policy))


_registry: dict[object, list[Any]] = {}  # key -> [balancer, refcount]
_registry_lock = threading.Lock()


def balancer_key(
    kind: str, target: Target, mode: str, policy: str | RoutingPolicy, **settings: Any
) -> object:
    """The sharing key of a balancer; unhashable settings make it unique (no sharing)."""
    key = (kind, target, mode, _policy_key(policy), *sorted((k, _hashable(v)) for k, v in settings.items()))
    try:
        hash(key)
    except TypeError:
        return object()
    return key


def _hashable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return ("id", id(value))  # credentials, throttles, loops...: shared only when the same object


def acquire(key: object, factory: Callable[[], Any]) -> Any:
    """The live balancer for ``key`` (made by ``factory`` on first use), with one more reference."""
    with _registry_lock:
        entry = _registry.get(key)
        if entry is None:
            entry = _registry[key] = [factory(), 0]
            entry[0]._key = key
        entry[1] += 1
        return entry[0]


def release(balancer: Any) -> bool:
    """Drop one reference; True when it was the last one (the caller then closes the balancer)."""
    key = getattr(balancer, "_key", None)
    with _registry_lock:
        entry = _registry.get(key)
        if entry is None or entry[0] is not balancer:
            return True
        entry[1] -= 1
        if entry[1] > 0:
            return False
        del _registry[key]
        return True


def settings(
    *,
    credentials: grpc.ChannelCredentials | None,
    options: Options,
    lookaside_credentials: grpc.ChannelCredentials | None,
    init_timeout: float,
    max_staleness: float | None,
    pick_cache_ttl: float,
    throttle: bool | AdaptiveThrottle,
    tls_server_name: str | None = None,
) -> dict[str, Any]:
    """The balancer settings of a channel or interceptor (the sharing key is built from them)."""
    out: dict[str, Any] = dict(
        credentials=credentials,
        options=tuple(options),
        lookaside_credentials=lookaside_credentials,
        init_timeout=init_timeout,
        max_staleness=max_staleness,
        pick_cache_ttl=pick_cache_ttl,
        throttle=throttle,
    )
    if tls_server_name is not None:  # only when given: keeps the key shared with interceptors' balancers
        out["tls_server_name"] = tls_server_name
    return out


def shared(
    kind: str,
    factory: Callable[..., Any],
    target: Target,
    mode: Mode,
    policy: str | RoutingPolicy,
    settings: dict[str, Any],
    loop: object = None,
    share: bool = True,
) -> Any:
    """The balancer for these settings, shared by every channel and interceptor asking for the same ones
    (aio ones per event loop ``loop``; none when not ``share``), with one more reference (give it back
    with :func:`release`)."""
    extra = {"loop": loop} if loop is not None else {}
    key = balancer_key(kind, target, mode, policy, **extra, **settings) if share else object()
    return acquire(key, lambda: factory(target, mode=mode, policy=policy, **settings))


#: The channel arguments naming the TLS server (and the :authority) of backends dialled by IP.
TLS_NAME_OPTIONS = ("grpc.ssl_target_name_override", "grpc.default_authority")


def backend_options(
    target: Target, credentials: grpc.ChannelCredentials | None, options: Options, tls_server_name: str | None
) -> tuple[tuple[str, Any], ...]:
    """The options of the per-backend channels. Backends are dialled by pod IP, so with channel credentials
    the TLS server name to verify (and the :authority) is ``tls_server_name``, by default the Service DNS
    name ``<service>.<namespace>.svc``; options the user set themselves win; ``tls_server_name=""`` adds
    nothing (the certificate must then name the pod IP)."""
    opts = tuple(options)
    if credentials is None or tls_server_name == "":
        return opts
    name = tls_server_name or f"{target.service}.{target.namespace}.svc"
    given = {key for key, _ in opts}
    return opts + tuple((key, name) for key in TLS_NAME_OPTIONS if key not in given)


def _open_channel(
    grpc_module: Any, address: str, credentials: grpc.ChannelCredentials | None, options: Options
) -> Any:
    """A ``grpc`` or ``grpc.aio`` (``grpc_module``) channel to ``address``, secure when given credentials."""
    if credentials is None:
        return grpc_module.insecure_channel(address, options=list(options))
    return grpc_module.secure_channel(address, credentials, options=list(options))


class _BalancerBase:
    """What the sync and aio balancers share: construction (pool, lookaside channel, resolver, ejector), the
    pool's retirement rule, load reports, ejection and stats. Subclasses name their ``grpc`` module, their
    resolver classes and how a retired backend channel is closed."""

    #: ``grpc`` or ``grpc.aio``: the module the pooled and lookaside channels come from.
    _grpc: Any
    _watch_resolver: Callable[..., Any]
    _per_call_resolver: Callable[..., Any]

    def __init__(
        self,
        target: Target,
        *,
        mode: Mode = WATCH,
        policy: str | RoutingPolicy = "round_robin",
        credentials: grpc.ChannelCredentials | None = None,
        options: Options = (),
        lookaside_credentials: grpc.ChannelCredentials | None = None,
        init_timeout: float = DEFAULT_INIT_TIMEOUT,
        max_staleness: float | None = DEFAULT_MAX_STALENESS,
        pick_cache_ttl: float = 0.0,
        throttle: bool | AdaptiveThrottle = True,
        tls_server_name: str | None = None,
    ) -> None:
        self.target = target
        self.mode = mode
        self.policy = resolve_policy(policy)
        self.counters = Counters()
        self._key: object = None
        #: Latency feedback for the policy, or None when it needs none: then calls are not timed at all.
        self.observe: Callable[[str, float], None] | None = None
        #: Whether this balancer reports its load to the lookaside (server-assisted policies, and the load
        #: routers of per_call mode).
        self.reports_load = False
        self.report_interval = LOAD_REPORT_INTERVAL
        self.client_id = secrets.token_hex(8)
        self._reported_picks: dict[str, int] = {}
        #: Load reports sent / failed (for tests and debugging).
        self.reports_sent = 0
        self.reports_failed = 0
        mod = self._grpc
        opts = backend_options(target, credentials, options, tls_server_name)
        self.pool: ChannelPool[Any] = ChannelPool(
            lambda address: _open_channel(mod, address, credentials, opts), self._close_retired
        )
        self.lookaside_channel = _open_channel(
            mod, target.lookaside, lookaside_credentials, LOOKASIDE_CHANNEL_OPTIONS
        )
        self._stub = stub = protocol.LookasideStub(self.lookaside_channel)
        kw: dict[str, Any] = {"max_staleness": max_staleness, "counters": self.counters}
        if mode == WATCH:
            self.resolver = self._watch_resolver(target, stub, self._on_change, init_timeout, **kw)
        else:
            kw.update(pick_cache_ttl=pick_cache_ttl, throttle=throttle)
            self.resolver = self._per_call_resolver(target, stub, init_timeout, **kw)
        self._setup_load()
        self.ejector = Ejector(
            self.resolver.population, self.resolver.set_ejected, self.counters, on_eject=self._on_eject
        )
        #: Restored addresses awaiting a success (tested per call: an empty dict is falsy).
        self.probation = self.ejector.probation
        track(self)

    def _close_retired(self, channel: Any) -> None:
        raise NotImplementedError

    def _setup_load(self) -> None:
        """Wire the policy to the pool (in-flight counts) and decide on call timing and load reports."""
        policy = self.policy
        policy.bind(self.pool)
        self.reports_load = policy.reports_load or (
            self.mode != WATCH and policy.router_type in protocol.LOAD_ROUTERS
        )
        if policy.needs_latency or self.reports_load:
            self.observe = policy.observe

    def load_report(self) -> protocol.LoadReport:
        """This client's load per endpoint of the current set: calls in flight (the pool's counts), the
        policy's latency estimate and calls started since the previous report (bounded in size)."""
        slots = self.pool.slots()
        latency = self.policy.latency_ms
        last = self._reported_picks
        now_picks: dict[str, int] = {}
        loads = []
        for ep in self.resolver.candidates()[:MAX_REPORT_ENDPOINTS]:
            slot = slots.get(ep.address)
            outstanding = picks = 0
            if slot is not None:
                outstanding = slot.in_flight
                picks = now_picks[ep.address] = slot.picks
            calls = picks - last.get(ep.address, 0)
            loads.append(
                protocol.EndpointLoad(
                    ip=ep.ip,
                    port=ep.port,
                    outstanding=outstanding,
                    latency_ms=latency(ep.address),
                    calls=calls if calls >= 0 else picks,
                )
            )
        self._reported_picks = now_picks
        t = self.target
        return protocol.LoadReport(
            service=t.service,
            namespace=t.namespace,
            port=t.port,
            client_id=self.client_id,
            interval_ms=int(self.report_interval * 1000),
            endpoints=loads,
        )

    def _report_failed(self, err: Exception) -> None:
        """Log a failed load report (from its ``except`` clause); the report loop goes on."""
        if isinstance(err, grpc.RpcError):
            log.debug("%s: load report failed: %s", self.target, err)
        else:
            log.exception("%s: load report failed", self.target)

    def _report_done(self, ack: protocol.LoadReportAck | None) -> None:
        if ack is None:
            self.reports_failed += 1
            return
        self.reports_sent += 1
        if ack.interval_ms:
            self.report_interval = min(60.0, max(0.05, ack.interval_ms / 1000.0))

    def _on_eject(self, address: str) -> None:
        # A fresh channel (and connection, without inherited reconnect backoff) once the address is back.
        self.pool.retire([address])

    def report_unavailable(self, address: str) -> None:
        """A call to ``address`` failed with UNAVAILABLE before any response: eject it for a cool-down."""
        self.ejector.eject(address)

    def repick(self, failed: str) -> Endpoint | None:
        """Another endpoint than ``failed`` for the one retry, from the known set; None if there is none."""
        cands = tuple(e for e in self.resolver.candidates() if e.address != failed)
        if not cands:
            return None
        ejected = self.ejector.ejected
        healthy = tuple(e for e in cands if e.address not in ejected)
        return self.policy.pick(healthy or cands)

    def stats(self) -> Stats:
        """A snapshot of this balancer's counters."""
        return self.counters.snapshot(self.pool.picks())

    def _stats_items(self) -> Iterable[tuple[str, Stats]]:
        return [(str(self.target), self.stats())]

    def _closed(self) -> None:
        self.ejector.close()
        untrack(self)

    def _on_change(self, current: set[str]) -> None:
        # Addresses not in the new set are retired: their channels close after their in-flight calls.
        self.policy.retain(current)
        gone = self.pool.addresses() - current
        if gone:
            log.info("%s: retiring channels to %s", self.target, sorted(gone))
            self.pool.retire(gone)


class Balancer(_BalancerBase):
    """Sync core for one target: blocking channels, a watch thread, a load report thread."""

    _grpc = grpc
    _watch_resolver = WatchResolver
    _per_call_resolver = PerCallResolver
    resolver: SyncResolver

    def __init__(self, target: Target, **kwargs: Any) -> None:
        """Arguments as :class:`_BalancerBase`."""
        self._report_stop = threading.Event()
        self._reporter: threading.Thread | None = None
        super().__init__(target, **kwargs)
        if self.reports_load:
            self._reporter = threading.Thread(
                target=self._report_loop, name=f"lookaside-load-{target}", daemon=True
            )
            self._reporter.start()

    def _close_retired(self, channel: grpc.Channel) -> None:
        # A retired channel may be closed from a gRPC callback thread: never block it.
        threading.Thread(target=channel.close, name="lookaside-close", daemon=True).start()

    def _report_loop(self) -> None:
        while not self._report_stop.wait(self.report_interval):
            try:
                ack = self._stub.ReportLoad(self.load_report(), timeout=max(0.5, self.report_interval))
            except Exception as e:  # keep reporting whatever happens
                self._report_failed(e)
                ack = None
            self._report_done(ack)

    def close(self) -> None:
        """Stop the resolver (joining its thread), then close the pooled and the lookaside channels."""
        self._closed()
        self._report_stop.set()
        if self._reporter is not None and self._reporter is not threading.current_thread():
            self._reporter.join(timeout=5)
        self.resolver.close()
        for ch in self.pool.close():
            ch.close()
        self.lookaside_channel.close()


class AioBalancer(_BalancerBase):
    """Aio core for one target: grpc.aio channels, a watch task, a load report task."""

    _grpc = grpc.aio
    _watch_resolver = AioWatchResolver
    _per_call_resolver = AioPerCallResolver
    resolver: AioResolver

    def __init__(self, target: Target, **kwargs: Any) -> None:
        """Arguments as :class:`_BalancerBase`."""
        self._closing: set[asyncio.Task[None]] = set()
        self._reporter: asyncio.Task[None] | None = None
        self._report_closed = False
        super().__init__(target, **kwargs)
        self._start_reporter()

    def _start_reporter(self) -> None:
        """Start the load report task in the running loop (once; later from the first endpoint set)."""
        if not self.reports_load or self._reporter is not None or self._report_closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._reporter = loop.create_task(self._report_loop(), name=f"lookaside-load-{self.target}")

    def _on_change(self, current: set[str]) -> None:
        super()._on_change(current)
        if self._reporter is None:
            self._start_reporter()

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.report_interval)
            try:
                ack = await self._stub.ReportLoad(self.load_report(), timeout=max(0.5, self.report_interval))
            except Exception as e:  # keep reporting whatever happens (cancellation is no Exception)
                self._report_failed(e)
                ack = None
            self._report_done(ack)

    def _close_retired(self, channel: grpc.aio.Channel) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # retired from a foreign thread: let grpc close it when collected
            return
        task = loop.create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self, grace: float | None = None) -> None:
        """Stop the resolver task, then close every pooled channel and the lookaside channel."""
        self._closed()
        self._report_closed = True
        reporter, self._reporter = self._reporter, None
        if reporter is not None and not reporter.done():
            reporter.cancel()
            try:
                await reporter
            except (asyncio.CancelledError, Exception):
                pass
        await self.resolver.aclose()
        channels = self.pool.close()
        await asyncio.gather(*(ch.close(grace) for ch in channels), *self._closing, return_exceptions=True)
        await self.lookaside_channel.close()
