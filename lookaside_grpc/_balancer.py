"""The per-target core: resolver + policy + channel pool + ejection + counters + connectivity, shared by
channels and interceptors. One balancer exists per :class:`Settings` (and flavour, and event loop for aio);
holders take a :class:`Lease` and the last lease given back (``close()``, or the holder being garbage
collected) stops its threads/tasks and closes its channels."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

import grpc
import grpc.aio

from lookaside_grpc import protocol
from lookaside_grpc._budget import Budget
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._health import Ejector
from lookaside_grpc._policies import (
    RoutingPolicy,
    SlowStart,
    ZoneAware,
    resolve_policy,
    with_slow_start,
    with_zone,
)
from lookaside_grpc._pool import ChannelPool
from lookaside_grpc._resolvers import (
    AioLookasideCalls,
    AioPerCallResolver,
    AioResolver,
    AioWatchResolver,
    Connectivity,
    LookasideCalls,
    PerCallResolver,
    Query,
    SyncResolver,
    WatchResolver,
)
from lookaside_grpc._ring_hash import Metadata, RingHash, request_hash
from lookaside_grpc._settings import OptionValue, PerCall, Settings, Watch
from lookaside_grpc._stats import Counters, Stats, track, untrack

log = logging.getLogger(__name__)

#: How often a balancer reports its load (ReportLoad) when its policy is server-assisted; the lookaside's
#: answer may ask for another interval.
LOAD_REPORT_INTERVAL = 1.0
#: Most endpoints one load report lists (the lookaside ignores more).
MAX_REPORT_ENDPOINTS = 1000

C = TypeVar("C", grpc.Channel, grpc.aio.Channel)
StateCallback = Callable[[Connectivity], None]


def _options(opts: Iterable[tuple[str, OptionValue]]) -> list[tuple[str, OptionValue]]:
    return list(opts)


def open_sync(
    address: str, credentials: grpc.ChannelCredentials | None, options: Iterable[tuple[str, OptionValue]]
) -> grpc.Channel:
    """A sync channel through ``grpc.insecure_channel``/``secure_channel`` (so instrumentation that wraps
    them, as OpenTelemetry's, sees the backend calls too)."""
    if credentials is None:
        return grpc.insecure_channel(address, options=_options(options))
    return grpc.secure_channel(address, credentials, options=_options(options))


def open_aio(
    address: str, credentials: grpc.ChannelCredentials | None, options: Iterable[tuple[str, OptionValue]]
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``, secure when given credentials."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=_options(options))
    return grpc.aio.secure_channel(address, credentials, options=_options(options))


class BalancerBase(Generic[C]):
    """What the sync and aio balancers share: pool, ejection, load reports, connectivity and stats."""

    resolver: SyncResolver | AioResolver

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        mode = settings.mode
        self.query = Query(
            settings.target, settings.lookaside, mode.batch if isinstance(mode, PerCall) else 1
        )
        self.target = settings.target
        self.policy: RoutingPolicy = (
            RingHash(settings.hash_key) if settings.hash_key is not None else resolve_policy(settings.policy)
        )
        #: Slow start (watch mode; per_call: the lookaside picks): ``policy`` is this wrapper only while an
        #: endpoint ramps up (swapped at set changes), so calls pay nothing for it otherwise.
        self._slow_start: SlowStart | None = None
        if not isinstance(mode, PerCall) and settings.slow_start:
            self._slow_start = with_slow_start(self.policy, settings.slow_start)
        #: Zone-aware routing (watch mode, a client zone set): wraps the policy (or the slow start) always.
        self._zone: ZoneAware | None = None
        if not isinstance(mode, PerCall) and settings.zone:
            self.policy = self._zone = with_zone(self.policy, settings.zone)
        self.counters = Counters()
        self.closed = False
        #: Latency feedback for the policy, or None when it needs none: then calls are not timed at all.
        self.observe: Callable[[str, float], None] | None = None
        self.reports_load = self.policy.reports_load or (
            isinstance(mode, PerCall) and self.policy.router_type in protocol.LOAD_ROUTERS
        )
        if self.policy.needs_latency or self.reports_load:
            self.observe = self.policy.observe
        self.report_interval = LOAD_REPORT_INTERVAL
        self.client_id = secrets.token_hex(8)
        self._reported_picks: dict[str, int] = {}
        #: Load reports sent / failed (for tests and debugging).
        self.reports_sent = 0
        self.reports_failed = 0
        self._subscribers: list[StateCallback] = []
        self._state_lock = threading.Lock()
        self._last_state: Connectivity | None = None

    def _finish_init(self, pool: ChannelPool[C]) -> None:
        self.pool: ChannelPool[C] = pool
        self.policy.bind(pool)
        if isinstance(self.policy, RingHash):  # its ring spans the whole set: ejected ones are walked past
            self.policy.follow(self.resolver.candidates)
        #: The retry budget (None = unlimited), consulted at the one retry decision.
        self.budget: Budget | None = None
        if self.settings.retry_budget is not None:
            self.budget = Budget(self.settings.retry_budget, lambda: sum(pool.picks().values()))
        self.ejector = Ejector(
            self.resolver.population, self.resolver.set_ejected, self.counters, on_eject=self._on_eject
        )
        #: Restored addresses awaiting a success (tested per call: an empty dict is falsy).
        self.probation = self.ejector.probation
        track(self)

    def _resolver_kwargs(self) -> dict[str, object]:
        s = self.settings
        return {"max_staleness": s.max_staleness, "counters": self.counters, "on_state": self._on_state}

    # -- connectivity --------------------------------------------------------------------------------------

    def connectivity(self) -> Connectivity:
        """READY when the target has a ready endpoint (see the resolvers); SHUTDOWN once closed."""
        if self.closed:
            return Connectivity.SHUTDOWN
        return self.resolver.connectivity()

    def subscribe(self, callback: StateCallback) -> None:
        """Call ``callback`` with the current state now and with every change after."""
        with self._state_lock:
            self._subscribers.append(callback)
        callback(self.connectivity())

    def unsubscribe(self, callback: StateCallback) -> None:
        with self._state_lock:
            try:
                self._subscribers.remove(callback)
            except ValueError:
                pass

    def _on_state(self) -> None:
        state = self.connectivity()
        with self._state_lock:
            if state is self._last_state:
                return
            self._last_state = state
            subscribers = list(self._subscribers)
        for cb in subscribers:
            try:
                cb(state)
            except Exception:
                log.exception("connectivity callback failed")

    # -- feedback from calls --------------------------------------------------------------------------------

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

    def succeeded(self, address: str) -> None:
        """A call to ``address`` got a response: a restored address leaves probation."""
        self.ejector.succeeded(address)

    def repick(self, failed: str, metadata: Metadata | None = None) -> Endpoint | None:
        """Another endpoint than ``failed`` for the one retry, from the known set; None if there is none.
        A hashing policy (``ring_hash``) takes the next ring entry of another endpoint for the call's key."""
        cands = tuple(e for e in self.resolver.candidates() if e.address != failed)
        if not cands:
            return None
        ejected = self.ejector.ejected
        healthy = tuple(e for e in cands if e.address not in ejected)
        policy = self.policy
        if policy.hash_key is not None:
            return policy.pick_hashed(healthy or cands, request_hash(metadata, policy.hash_key))
        return policy.pick(healthy or cands)

    def stats(self) -> Stats:
        """A snapshot of this balancer's counters."""
        return self.counters.snapshot(self.pool.picks())

    def _stats_items(self) -> Iterable[tuple[str, Stats]]:
        return [(str(self.target), self.stats())]

    def _mark_closed(self) -> None:
        self.closed = True
        self.ejector.close()
        untrack(self)
        self._on_state()

    def _on_change(self, current: set[str]) -> None:
        # Addresses not in the new set are retired: their channels close after their in-flight calls.
        slow = self._slow_start
        if slow is None:
            self.policy.retain(current)
        else:
            slow.retain(current)
            base = slow if slow.ramping else slow.inner
            if self._zone is not None:
                self._zone.inner = base
            else:
                self.policy = base
        gone = self.pool.addresses() - current
        if gone:
            log.info("%s: retiring channels to %s", self.target, sorted(gone))
            self.pool.retire(gone)
            self.ejector.forget(gone)


class Balancer(BalancerBase[grpc.Channel]):
    """Sync core for one target: blocking channels, a watch thread, a load report thread."""

    resolver: SyncResolver

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._report_stop = threading.Event()
        self._reporter: threading.Thread | None = None
        self.lookaside_channel = open_sync(
            settings.lookaside, settings.lookaside_credentials, settings.lookaside_options()
        )
        self.calls = LookasideCalls(self.lookaside_channel)
        backend_opts = settings.backend_options()
        creds = settings.credentials
        pool: ChannelPool[grpc.Channel] = ChannelPool(
            lambda address: open_sync(address, creds, backend_opts), self._close_retired
        )
        mode = settings.mode
        if isinstance(mode, Watch):
            self.resolver = WatchResolver(
                self.query,
                self.calls,
                self._on_change,
                max_staleness=settings.max_staleness,
                liveness_window=settings.liveness_window(),
                counters=self.counters,
                on_state=self._on_state,
            )
        else:
            self.resolver = PerCallResolver(
                self.query,
                self.calls,
                pick_cache_ttl=mode.pick_cache_ttl,
                throttle=mode.throttle,
                **self._resolver_kwargs(),
            )
        self._finish_init(pool)
        if isinstance(self.resolver, WatchResolver):
            self.resolver.connect()  # the watch thread starts once everything it calls back into exists
        if self.reports_load:
            self._reporter = threading.Thread(
                target=self._report_loop, name=f"lookaside-load-{self.target}", daemon=True
            )
            self._reporter.start()

    def _close_retired(self, channel: grpc.Channel) -> None:
        # A retired channel may be closed from a gRPC callback thread: never block it.
        threading.Thread(target=channel.close, name="lookaside-close", daemon=True).start()

    def _report_loop(self) -> None:
        while not self._report_stop.wait(self.report_interval):
            ack: protocol.LoadReportAck | None
            try:
                ack = self.calls.report_load(self.load_report(), timeout=max(0.5, self.report_interval))
            except Exception as e:  # keep reporting whatever happens
                self._report_failed(e)
                ack = None
            self._report_done(ack)

    def close(self) -> None:
        """Stop the resolver, close the lookaside channel (ending a Watch whatever object it is) and every
        pooled channel, then join the threads."""
        if self.closed:
            return
        self._mark_closed()
        self._report_stop.set()
        self.resolver.close()
        self.lookaside_channel.close()
        for ch in self.pool.close():
            ch.close()
        self.resolver.join()
        if self._reporter is not None and self._reporter is not threading.current_thread():
            self._reporter.join(timeout=5)


class AioBalancer(BalancerBase[grpc.aio.Channel]):
    """Aio core for one target: grpc.aio channels, a watch task, a load report task."""

    resolver: AioResolver

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._closing: set[asyncio.Task[None]] = set()
        self._reporter: asyncio.Task[None] | None = None
        self.lookaside_channel = open_aio(
            settings.lookaside, settings.lookaside_credentials, settings.lookaside_options()
        )
        self.calls = AioLookasideCalls(self.lookaside_channel)
        backend_opts = settings.backend_options()
        creds = settings.credentials
        pool: ChannelPool[grpc.aio.Channel] = ChannelPool(
            lambda address: open_aio(address, creds, backend_opts), self._close_retired
        )
        mode = settings.mode
        if isinstance(mode, Watch):
            self.resolver = AioWatchResolver(
                self.query,
                self.calls,
                self._on_change,
                max_staleness=settings.max_staleness,
                liveness_window=settings.liveness_window(),
                counters=self.counters,
                on_state=self._on_state,
            )
        else:
            self.resolver = AioPerCallResolver(
                self.query,
                self.calls,
                pick_cache_ttl=mode.pick_cache_ttl,
                throttle=mode.throttle,
                **self._resolver_kwargs(),
            )
        self._finish_init(pool)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # started on first use inside a loop
            pass
        else:
            if isinstance(self.resolver, AioWatchResolver):
                self.resolver.connect()
        self._start_reporter()

    def _start_reporter(self) -> None:
        """Start the load report task in the running loop (once; later from the first endpoint set)."""
        if not self.reports_load or self._reporter is not None or self.closed:
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
            ack: protocol.LoadReportAck | None
            try:
                ack = await self.calls.report_load(self.load_report(), timeout=max(0.5, self.report_interval))
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
        if self.closed:
            return
        self._mark_closed()
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


# -- sharing ---------------------------------------------------------------------------------------------

B = TypeVar("B", Balancer, AioBalancer)


class _Entry:
    __slots__ = ("balancer", "refs")

    def __init__(self, balancer: Balancer | AioBalancer) -> None:
        self.balancer = balancer
        self.refs = 0


_registry: dict[object, _Entry] = {}
_registry_lock = threading.Lock()


class Lease(Generic[B]):
    """One holder's reference to a shared balancer; :meth:`release` gives it back (idempotent). A holder
    that is garbage collected without closing gives it back through :func:`weakref.finalize`."""

    __slots__ = ("balancer", "_key", "_released", "__weakref__")

    def __init__(self, balancer: B, key: object) -> None:
        self.balancer: B = balancer
        self._key = key
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> bool:
        """Give the reference back; True when this was the last one (the caller closes the balancer)."""
        with _registry_lock:
            if self._released:
                return False
            self._released = True
            entry = _registry.get(self._key)
            if entry is None or entry.balancer is not self.balancer:
                return True
            entry.refs -= 1
            if entry.refs > 0:
                return False
            del _registry[self._key]
            return True


def _hashable_key(parts: tuple[object, ...]) -> object:
    try:
        hash(parts)
    except TypeError:  # an unhashable option value: this balancer is not shared
        return object()
    return parts


def lease_sync(settings: Settings) -> Lease[Balancer]:
    """A lease on the sync balancer for ``settings`` (made on first use)."""
    key = _hashable_key(("sync", settings))
    with _registry_lock:
        entry = _registry.get(key)
        if entry is None or not isinstance(entry.balancer, Balancer):
            entry = _registry[key] = _Entry(Balancer(settings))
        entry.refs += 1
        balancer = entry.balancer
        assert isinstance(balancer, Balancer)
        return Lease(balancer, key)


def lease_aio(settings: Settings, share: bool) -> Lease[AioBalancer]:
    """A lease on the aio balancer for ``settings`` in the running loop (none shared outside one)."""
    if share:
        key = _hashable_key(("aio", asyncio.get_running_loop(), settings))
    else:
        key = object()
    with _registry_lock:
        entry = _registry.get(key)
        if entry is None or not isinstance(entry.balancer, AioBalancer):
            entry = _registry[key] = _Entry(AioBalancer(settings))
        entry.refs += 1
        balancer = entry.balancer
        assert isinstance(balancer, AioBalancer)
        return Lease(balancer, key)


def release_sync(lease: Lease[Balancer], *, background: bool = False) -> None:
    """Give ``lease`` back; the last holder closes the balancer (in a thread when ``background``: from a
    garbage-collection finalizer nothing may block)."""
    if lease.release():
        if background:
            threading.Thread(target=lease.balancer.close, name="lookaside-close", daemon=True).start()
        else:
            lease.balancer.close()


def release_aio_in_gc(lease: Lease[AioBalancer], loop: asyncio.AbstractEventLoop | None) -> None:
    """Finalizer of an aio holder dropped without ``close()``: close the balancer in its loop if that
    still runs (its tasks die with the loop otherwise)."""
    if lease.release():
        close_in_loop(lease.balancer, loop)


def close_in_loop(balancer: AioBalancer, loop: asyncio.AbstractEventLoop | None) -> None:
    """Close an aio balancer from any thread: as a task in ``loop`` if it still runs."""
    if loop is None or loop.is_closed():
        balancer.closed = True
        return

    def close() -> None:
        task = loop.create_task(balancer.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    try:
        loop.call_soon_threadsafe(close)
    except RuntimeError:  # the loop closed meanwhile
        balancer.closed = True


_closing: set[asyncio.Task[None]] = set()


class Finalizer(Protocol):
    """What a holder keeps of its finalizer: ``detach()`` once it closed properly."""

    def detach(self) -> object: ...


def finalize_holder(holder: object, lease: Lease[Balancer] | Lease[AioBalancer]) -> Finalizer:
    """Release ``lease`` when ``holder`` is garbage collected without having closed it."""
    if isinstance(lease.balancer, Balancer):
        return weakref.finalize(holder, release_sync, lease, background=True)
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    return weakref.finalize(holder, release_aio_in_gc, lease, loop)


def live_balancers() -> int:
    """Balancers currently shared (for tests)."""
    with _registry_lock:
        return len(_registry)
