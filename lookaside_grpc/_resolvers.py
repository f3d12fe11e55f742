"""Resolution modes behind one interface: ``pick_nowait(policy)`` (hot path) and ``pick(policy, ...)``.

Both take the call's metadata, read only when the policy hashes a key of it (``ring_hash``).

``per_call``: one lookaside ``Resolve`` per call as in the original design (``batch`` > 1 asks for that many
picks at once and serves them in order). ``watch``: one background ``Watch`` stream per target keeps the local
endpoint set; calls pick locally with the policy, with no extra round trip. The state handling is sans-I/O
(``_WatchCore``, ``_PerCallCore``); sync resolvers add a daemon thread and blocking calls, aio resolvers a
task and grpc.aio calls.

Waiting follows grpc's channel semantics: while the first answer is on its way (CONNECTING) a pick waits;
once the lookaside failed with no usable set, or the set holds no ready endpoint (TRANSIENT_FAILURE), a pick
fails at once unless the call asked ``wait_for_ready``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
import grpc.aio

from lookaside_grpc import _timers, protocol
from lookaside_grpc._endpoints import Endpoint, EndpointState
from lookaside_grpc._errors import CALLER_ERRORS, PickError, from_lookaside_error
from lookaside_grpc._health import AdaptiveThrottle
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._ring_hash import Metadata, request_hash
from lookaside_grpc._stats import LOCAL_ROTATION, STALE, THROTTLED, Counters
from lookaside_grpc._target import Target

log = logging.getLogger(__name__)

Connectivity = grpc.ChannelConnectivity
_SERVICE = f"/{protocol.SERVICE_NAME}"


@dataclass(frozen=True, slots=True)
class Query:
    """What to resolve (a :class:`Target`) and where (the lookaside address); ``batch`` picks per Resolve."""

    target: Target
    lookaside: str
    batch: int = 1

    def __str__(self) -> str:
        return str(self.target)

    def resolve_request(self, router_type: int) -> protocol.Request:
        """The Resolve request for one call (or one batch of picks)."""
        t = self.target
        return protocol.Request(
            router=router_type,  # type: ignore[arg-type]
            service=t.service,
            namespace=t.namespace,
            port=t.port,
            count=self.batch,
        )

    def watch_request(self) -> protocol.WatchRequest:
        """The Watch request for this target."""
        t = self.target
        return protocol.WatchRequest(service=t.service, namespace=t.namespace, port=t.port)

    def endpoints_from_response(self, resp: protocol.Response) -> list[Endpoint]:
        """The picks of a Resolve response; an original-style answer (address only) uses the port number."""
        if resp.endpoints:
            return [Endpoint.from_proto(e) for e in resp.endpoints]
        if not resp.address:
            return []
        port = resp.port or self.target.port_number or 0
        return [Endpoint(resp.address, port)] if port else []


class LookasideCalls:
    """The lookaside's RPCs on a sync channel, typed (the generated stub is not)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.resolve: grpc.UnaryUnaryMultiCallable[protocol.Request, protocol.Response] = channel.unary_unary(
            f"{_SERVICE}/Resolve", protocol.Request.SerializeToString, protocol.Response.FromString
        )
        self.watch: grpc.UnaryStreamMultiCallable[protocol.WatchRequest, protocol.EndpointSet] = (
            channel.unary_stream(
                f"{_SERVICE}/Watch", protocol.WatchRequest.SerializeToString, protocol.EndpointSet.FromString
            )
        )
        self.report_load: grpc.UnaryUnaryMultiCallable[protocol.LoadReport, protocol.LoadReportAck] = (
            channel.unary_unary(
                f"{_SERVICE}/ReportLoad",
                protocol.LoadReport.SerializeToString,
                protocol.LoadReportAck.FromString,
            )
        )


class AioLookasideCalls:
    """The lookaside's RPCs on a grpc.aio channel, typed."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.resolve: grpc.aio.UnaryUnaryMultiCallable[protocol.Request, protocol.Response] = (
            channel.unary_unary(
                f"{_SERVICE}/Resolve", protocol.Request.SerializeToString, protocol.Response.FromString
            )
        )
        self.watch: grpc.aio.UnaryStreamMultiCallable[protocol.WatchRequest, protocol.EndpointSet] = (
            channel.unary_stream(
                f"{_SERVICE}/Watch", protocol.WatchRequest.SerializeToString, protocol.EndpointSet.FromString
            )
        )
        self.report_load: grpc.aio.UnaryUnaryMultiCallable[protocol.LoadReport, protocol.LoadReportAck] = (
            channel.unary_unary(
                f"{_SERVICE}/ReportLoad",
                protocol.LoadReport.SerializeToString,
                protocol.LoadReportAck.FromString,
            )
        )


class Backoff:
    """Exponential reconnect delay with jitter, reset once a stream delivers."""

    def __init__(self, initial: float = 0.1, maximum: float = 2.0, factor: float = 1.6) -> None:
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self._current = initial

    def reset(self) -> None:
        self._current = self.initial

    def next(self) -> float:
        delay = self._current * random.uniform(0.8, 1.2)
        self._current = min(self._current * self.factor, self.maximum)
        return delay


class ResolverBase(Protocol):
    """What a balancer and the call engine use of a resolver, sync or aio."""

    query: Query

    def pick_nowait(self, policy: RoutingPolicy, metadata: Metadata | None = None) -> Endpoint | None: ...
    def ready(
        self, policy: RoutingPolicy, wait_for_ready: bool, metadata: Metadata | None = None
    ) -> Endpoint | None: ...
    def set_ejected(self, ejected: frozenset[str]) -> None: ...
    def population(self) -> int: ...
    def candidates(self) -> tuple[Endpoint, ...]: ...
    def connectivity(self) -> Connectivity: ...


class SyncResolver(ResolverBase, Protocol):
    """How a sync balancer gets endpoints."""

    def pick(
        self,
        policy: RoutingPolicy,
        wait: float | None,
        wait_for_ready: bool,
        on_timeout: grpc.StatusCode,
        metadata: Metadata | None = None,
    ) -> Endpoint: ...
    def connect(self) -> None: ...
    def close(self) -> None: ...
    def join(self) -> None: ...


class AioResolver(ResolverBase, Protocol):
    """How an aio balancer gets endpoints."""

    async def pick(
        self,
        policy: RoutingPolicy,
        wait: float | None,
        wait_for_ready: bool,
        on_timeout: grpc.StatusCode,
        metadata: Metadata | None = None,
    ) -> Endpoint: ...
    def connect(self) -> None: ...
    async def aclose(self) -> None: ...


#: Called with the addresses of every endpoint set received (the pool retires the others).
OnChange = Callable[[set[str]], None]
#: Called whenever the resolver's connectivity may have changed.
OnState = Callable[[], None]


def _silent(err: PickError | None) -> bool:
    """Whether a broken stream means the lookaside went silent (keepalive pings unanswered) rather than
    answering with an error or closing the connection."""
    text = "" if err is None else err.details.lower()
    return "ping timeout" in text or "keepalive" in text


def _timeout_error(code: grpc.StatusCode, what: str, last: object) -> PickError:
    tail = f"; last error: {last}" if last else ""
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:  # grpc's own details, as a plain channel has them
        log.debug("deadline exceeded while waiting for %s%s", what, tail)
        return PickError(code, "Deadline Exceeded")
    return PickError(code, f"no answer in time while waiting for {what}{tail}")


class _WatchCore:
    """State handling shared by the sync and aio watch resolvers.

    While the Watch stream is up the set counts as confirmed; keepalive pings on the lookaside channel end
    the stream when the lookaside goes silent (process stopped, network partition). Once it breaks, the last
    set keeps serving until ``max_staleness`` seconds after the lookaside was last known alive (when it
    went silent: up to ``liveness_window`` seconds before the break); then it is dropped (a timer, nothing is
    checked per call) and picks fail with UNAVAILABLE (channels) or fall back (interceptors).
    """

    def __init__(
        self,
        query: Query,
        on_change: OnChange,
        *,
        max_staleness: float | None,
        liveness_window: float,
        counters: Counters,
        on_state: OnState,
    ) -> None:
        self.query = query
        self.state = EndpointState()
        self._on_change = on_change
        self._on_state = on_state
        self._closed = False
        self.max_staleness = max_staleness
        self.liveness_window = liveness_window
        self._counters = counters
        #: monotonic time the lookaside was last known alive, once the stream broke (None while it is up).
        self._broken_since: float | None = None
        self._stale_timer: _timers.Handle | None = None
        self._stale_lock = threading.Lock()

    def set_ejected(self, ejected: frozenset[str]) -> None:
        self.state.set_ejected(ejected)

    def population(self) -> int:
        return len(self.state.full)

    def candidates(self) -> tuple[Endpoint, ...]:
        """The known set to pick a retry from (empty once stale)."""
        state = self.state
        return () if state.stale else state.full

    def connectivity(self) -> Connectivity:
        """READY with a ready endpoint; TRANSIENT_FAILURE when the set is empty, stale or never came because
        the lookaside failed; CONNECTING while the first answer is on its way."""
        state = self.state
        if state.endpoints:
            return Connectivity.READY
        if state.received or state.error is not None:
            return Connectivity.TRANSIENT_FAILURE
        return Connectivity.CONNECTING

    def _start_stale_timer(self, delay: float) -> None:
        with self._stale_lock:
            if self._closed or self._stale_timer is not None:
                return
            self._stale_timer = _timers.call_later(delay, self._check_stale)

    def _check_stale(self) -> None:
        with self._stale_lock:
            self._stale_timer = None
        since = self._broken_since
        if since is None or self._closed or self.max_staleness is None:
            return
        left = since + self.max_staleness - time.monotonic()
        if left > 0.001:
            self._start_stale_timer(left)
            return
        if self.state.received and not self.state.stale:
            log.warning(
                "%s: no word from lookaside %s for %.3gs (max_staleness): dropping the last set",
                self.query,
                self.query.lookaside,
                self.max_staleness,
            )
            self.state.expire()
            self._state_changed()

    def _state_changed(self) -> None:
        self._on_state()

    def _cancel_stale_timer(self) -> None:
        with self._stale_lock:
            timer, self._stale_timer = self._stale_timer, None
        if timer is not None:
            timer.cancel()

    def _apply(self, es: protocol.EndpointSet) -> None:
        self._broken_since = None
        self._cancel_stale_timer()
        added, removed = self.state.update((Endpoint.from_proto(e) for e in es.endpoints), es.version)
        if added or removed:
            log.info(
                "%s: endpoint set v%d: %d endpoints (+%d -%d)",
                self.query,
                es.version,
                len(self.state.endpoints),
                len(added),
                len(removed),
            )
        self._on_change(self.state.addresses())

    def _watch_error(self, err: Exception | None) -> PickError:
        """Why the Watch stream stopped (``err`` None: the lookaside ended it); call it from the ``except``
        clause, so an unexpected error is logged with its traceback."""
        if err is None:
            return PickError(grpc.StatusCode.UNAVAILABLE, "the lookaside ended the Watch stream")
        if isinstance(err, grpc.RpcError):
            return from_lookaside_error(err, str(self.query), self.query.lookaside)
        log.exception("%s: Watch failed", self.query)  # keep watching whatever happens
        return PickError(grpc.StatusCode.UNAVAILABLE, f"Watch failed: {err!r}")

    def _broken(self, err: PickError, backoff: float) -> None:
        self.state.error = err
        if self._broken_since is None:
            now = time.monotonic()
            # a silent lookaside was last heard of up to one keepalive window ago
            self._broken_since = now - (self.liveness_window if _silent(err) else 0.0)
            if self.max_staleness is not None and self.state.received:
                self._start_stale_timer(self._broken_since + self.max_staleness - now)
        log.warning(
            "%s: Watch on lookaside %s broke (%s); retrying in %.2fs, keeping %d endpoints",
            self.query,
            self.query.lookaside,
            err,
            backoff,
            len(self.state.endpoints),
        )

    def ready(
        self, policy: RoutingPolicy, wait_for_ready: bool, metadata: Metadata | None = None
    ) -> Endpoint | None:
        """A pick if a ready endpoint is known; None to wait; raise to fail the call now."""
        return self._ready(policy, wait_for_ready, metadata)

    def _ready(
        self, policy: RoutingPolicy, wait_for_ready: bool, metadata: Metadata | None = None
    ) -> Endpoint | None:
        """A pick if a ready endpoint is known; None to wait; raise to fail the call now."""
        state = self.state
        eps = state.endpoints
        if eps:
            key = policy.hash_key
            return policy.pick(eps) if key is None else policy.pick_hashed(eps, request_hash(metadata, key))
        err = state.error
        if isinstance(err, PickError) and err.code in CALLER_ERRORS and not state.received:
            raise err
        if wait_for_ready:
            return None
        if state.stale:
            raise PickError(
                grpc.StatusCode.UNAVAILABLE,
                f"the endpoint set of {self.query} is stale: lookaside {self.query.lookaside} has not "
                f"confirmed it for more than {self.max_staleness}s; last error: {state.error}",
                reason=STALE,
            )
        if state.received:
            raise PickError(grpc.StatusCode.UNAVAILABLE, f"no ready endpoint for {self.query}")
        if isinstance(err, PickError):
            raise PickError(err.code, err.details, err.reason)
        return None

    def pick_nowait(self, policy: RoutingPolicy, metadata: Metadata | None = None) -> Endpoint | None:
        """The hot path: pick from the known set, no I/O (the metadata is read only by a hashing policy)."""
        eps = self.state.endpoints
        if not eps:
            return None
        key = policy.hash_key
        return policy.pick(eps) if key is None else policy.pick_hashed(eps, request_hash(metadata, key))


def _cancel(call: object) -> None:
    """Cancel a call if it can be (instrumented channels may hand out plain generators)."""
    cancel = getattr(call, "cancel", None)
    if callable(cancel):
        try:
            cancel()
        except Exception:
            log.debug("cancelling %r failed", call, exc_info=True)


class WatchResolver(_WatchCore):
    """Sync ``watch`` mode: a daemon thread follows the Watch stream and reconnects with backoff."""

    def __init__(
        self,
        query: Query,
        calls: LookasideCalls,
        on_change: OnChange,
        *,
        max_staleness: float | None,
        liveness_window: float,
        counters: Counters,
        on_state: OnState,
    ) -> None:
        super().__init__(
            query,
            on_change,
            max_staleness=max_staleness,
            liveness_window=liveness_window,
            counters=counters,
            on_state=on_state,
        )
        self._calls = calls
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._call: object = None
        self._thread = threading.Thread(target=self._run, name=f"lookaside-watch-{query}", daemon=True)

    def connect(self) -> None:
        """Start the watch thread (once; the balancer does it when it is fully built)."""
        with self._cond:
            if self._thread.ident is not None or self._closed:
                return
            self._thread.start()

    def pick(
        self,
        policy: RoutingPolicy,
        wait: float | None,
        wait_for_ready: bool,
        on_timeout: grpc.StatusCode,
        metadata: Metadata | None = None,
    ) -> Endpoint:
        """Wait up to ``wait`` seconds (None = no limit) for a ready endpoint, then pick."""
        deadline = None if wait is None else time.monotonic() + wait
        with self._cond:
            while True:
                ep = self._ready(policy, wait_for_ready, metadata)
                if ep is not None:
                    return ep
                if self._stop.is_set():
                    raise PickError(grpc.StatusCode.UNAVAILABLE, "the lookaside channel is closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise _timeout_error(on_timeout, f"endpoints of {self.query}", self.state.error)
                self._cond.wait(left)

    def _state_changed(self) -> None:
        with self._cond:
            self._cond.notify_all()
        self._on_state()

    def _run(self) -> None:
        request = self.query.watch_request()
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                call: Iterator[protocol.EndpointSet] = self._calls.watch(request)
                with self._cond:
                    self._call = call
                if self._stop.is_set():
                    _cancel(call)
                    break
                for es in call:
                    backoff.reset()
                    self._apply(es)
                    self._state_changed()
                err = self._watch_error(None)
            except Exception as e:
                if self._stop.is_set():
                    break
                err = self._watch_error(e)
            delay = backoff.next()
            self._broken(err, delay)
            self._state_changed()
            self._stop.wait(delay)
        log.debug("%s: watch thread stopped", self.query)

    def close(self) -> None:
        """Stop the stream (the thread ends once the lookaside channel is closed too: :meth:`join`)."""
        self._closed = True
        self._cancel_stale_timer()
        self._stop.set()
        with self._cond:
            call = self._call
            self._cond.notify_all()
        _cancel(call)

    def join(self) -> None:
        """Wait for the watch thread (not from itself)."""
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class AioWatchResolver(_WatchCore):
    """Aio ``watch`` mode: a task follows the Watch stream; started on first use inside the event loop."""

    def __init__(
        self,
        query: Query,
        calls: AioLookasideCalls,
        on_change: OnChange,
        *,
        max_staleness: float | None,
        liveness_window: float,
        counters: Counters,
        on_state: OnState,
    ) -> None:
        super().__init__(
            query,
            on_change,
            max_staleness=max_staleness,
            liveness_window=liveness_window,
            counters=counters,
            on_state=on_state,
        )
        self._calls = calls
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def connect(self) -> None:
        """Start the watch task in the running loop (once)."""
        if self._task is None and not self._closed:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name=f"lookaside-watch-{self.query}")

    def connectivity(self) -> Connectivity:
        if self._task is None and not self.state.endpoints:
            return Connectivity.IDLE
        return super().connectivity()

    def pick_nowait(self, policy: RoutingPolicy, metadata: Metadata | None = None) -> Endpoint | None:
        eps = self.state.endpoints
        if eps:
            key = policy.hash_key
            return policy.pick(eps) if key is None else policy.pick_hashed(eps, request_hash(metadata, key))
        if self._task is None:
            self.connect()
        return None

    def changed(self) -> asyncio.Event:
        """An event set at the next state change."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    async def pick(
        self,
        policy: RoutingPolicy,
        wait: float | None,
        wait_for_ready: bool,
        on_timeout: grpc.StatusCode,
        metadata: Metadata | None = None,
    ) -> Endpoint:
        """Wait up to ``wait`` seconds (None = no limit) for a ready endpoint, then pick."""
        self.connect()
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            changed = self.changed()
            ep = self._ready(policy, wait_for_ready, metadata)
            if ep is not None:
                return ep
            if self._closed:
                raise PickError(grpc.StatusCode.UNAVAILABLE, "the lookaside channel is closed")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise _timeout_error(on_timeout, f"endpoints of {self.query}", self.state.error)
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                pass

    def _state_changed(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            loop = self._loop
            if loop is None or _in_loop(loop):
                changed.set()
            elif not loop.is_closed():  # expired on the timer thread: wake the waiters in their loop
                loop.call_soon_threadsafe(changed.set)
        self._on_state()

    async def _run(self) -> None:
        request = self.query.watch_request()
        backoff = Backoff()
        while True:
            try:
                call = self._calls.watch(request)
                async for es in call:
                    backoff.reset()
                    self._apply(es)
                    self._state_changed()
                err = self._watch_error(None)
            except Exception as e:  # cancellation is no Exception: it ends the task
                err = self._watch_error(e)
            delay = backoff.next()
            self._broken(err, delay)
            self._state_changed()
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        """Cancel the watch task and wait for it."""
        self._closed = True
        self._cancel_stale_timer()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._state_changed()


class _PerCallCore:
    """Shared ``per_call`` logic: batched picks not used yet, the pick cache, the last known set and the
    throttle.

    The last known set is the union of the picks of the Resolves answered for the current set version; when a
    Resolve fails (or is throttled) picks rotate locally over it, up to ``max_staleness`` seconds after the
    last successful Resolve. ``pick_cache_ttl`` > 0 reuses the picks of one Resolve (rotating over them) for
    that many seconds, as RLS caches its targets.
    """

    MAX_KNOWN = 1024

    def __init__(
        self,
        query: Query,
        *,
        max_staleness: float | None,
        counters: Counters,
        pick_cache_ttl: float,
        throttle: bool | AdaptiveThrottle,
        on_state: OnState,
    ) -> None:
        self.query = query
        self._picks: deque[Endpoint] = deque()
        self._requests: dict[int, protocol.Request] = {}
        self.max_staleness = max_staleness
        self._counters = counters
        self._on_state = on_state
        self.pick_cache_ttl = pick_cache_ttl
        self._cached: tuple[Endpoint, ...] = ()
        self._cache_until = 0.0
        self.throttler: AdaptiveThrottle | None = (
            throttle if isinstance(throttle, AdaptiveThrottle) else (AdaptiveThrottle() if throttle else None)
        )
        self.known: tuple[Endpoint, ...] = ()
        self._known_version: int | None = None
        self._last_ok = 0.0
        self.ejected: frozenset[str] = frozenset()
        self._state = Connectivity.IDLE
        self._closed = False

    def set_ejected(self, ejected: frozenset[str]) -> None:
        self.ejected = ejected

    def population(self) -> int:
        return len(self.known)

    def candidates(self) -> tuple[Endpoint, ...]:
        """The known set to pick a retry from (empty once stale)."""
        return self._fresh_known()

    def connectivity(self) -> Connectivity:
        """IDLE before the first Resolve; READY after one that named an endpoint (while its set is fresh);
        TRANSIENT_FAILURE after a failed one."""
        if self._state is Connectivity.READY and not self._fresh_known():
            return Connectivity.TRANSIENT_FAILURE
        return self._state

    def _set_state(self, state: Connectivity) -> None:
        if state is not self._state:
            self._state = state
            self._on_state()

    def ready(
        self, policy: RoutingPolicy, wait_for_ready: bool, metadata: Metadata | None = None
    ) -> Endpoint | None:
        """A pick on hand (batched or cached), or None: a Resolve is needed."""
        return self.pick_nowait(policy)

    def _request(self, policy: RoutingPolicy) -> protocol.Request:
        req = self._requests.get(policy.router_type)
        if req is None:
            req = self._requests[policy.router_type] = self.query.resolve_request(policy.router_type)
        return req

    def _local(self, policy: RoutingPolicy, eps: tuple[Endpoint, ...]) -> Endpoint:
        ejected = self.ejected
        if ejected:
            eligible = tuple(e for e in eps if e.address not in ejected)
            return policy.pick(eligible or eps)
        return policy.pick(eps)

    def pick_nowait(self, policy: RoutingPolicy, metadata: Metadata | None = None) -> Endpoint | None:
        """A pick left over from the last batch, or from the pick cache, if any (the lookaside picked: the
        call's metadata plays no part; hashing policies are refused in per_call mode)."""
        while self._picks:
            try:
                ep = self._picks.popleft()
            except IndexError:
                return None
            if ep.address not in self.ejected:
                return ep
        if self._cached and time.monotonic() < self._cache_until:
            return self._local(policy, self._cached)
        return None

    def _fresh_known(self) -> tuple[Endpoint, ...]:
        known = self.known
        if known and self.max_staleness is not None and time.monotonic() - self._last_ok > self.max_staleness:
            return ()
        return known

    def _before(self, policy: RoutingPolicy, wait: float | None) -> tuple[Endpoint | None, float | None]:
        """A pick on hand (batched or cached) or a local one if the Resolve is throttled; else None and how
        long the Resolve may take."""
        ep = self.pick_nowait(policy)
        if ep is not None:
            return ep, 0.0
        known = self._fresh_known()
        if known and self.throttler is not None and self.throttler.throttle():
            self._counters.fallback(THROTTLED)
            return self._local(policy, known), 0.0
        if known and wait is not None:  # leave the call time to go elsewhere if the lookaside is slow
            wait *= 0.5
        return None, wait

    def _failed(
        self, err: grpc.RpcError, policy: RoutingPolicy, whole_wait: bool, on_timeout: grpc.StatusCode
    ) -> Endpoint:
        self._counters.resolve(False)
        if self.throttler is not None:
            self.throttler.record(False)
        error = from_lookaside_error(err, str(self.query), self.query.lookaside)
        if error.code in CALLER_ERRORS:
            raise error
        self._set_state(Connectivity.TRANSIENT_FAILURE)
        known = self._fresh_known()
        if known:
            self._counters.fallback(LOCAL_ROTATION)
            return self._local(policy, known)
        timed_out = isinstance(err, grpc.Call | grpc.aio.AioRpcError) and (
            err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        )
        if timed_out and whole_wait:
            raise _timeout_error(on_timeout, f"a Resolve of {self.query}", error)
        if self.known:
            error.reason = STALE
            error.details += f" (last known set older than max_staleness={self.max_staleness}s)"
        raise error

    def _take(self, resp: protocol.Response, policy: RoutingPolicy | None) -> Endpoint | None:
        """Keep what a Resolve answered; the first pick for the call (``policy`` None: keep them all)."""
        self._counters.resolve(True)
        if self.throttler is not None:
            self.throttler.record(True)
        eps = self.query.endpoints_from_response(resp)
        if not eps:
            self._set_state(Connectivity.TRANSIENT_FAILURE)
            raise PickError(
                grpc.StatusCode.UNAVAILABLE, f"the lookaside returned no endpoint for {self.query}"
            )
        now = time.monotonic()
        self._last_ok = now
        if resp.version != self._known_version or not self.known:
            self._known_version = resp.version
            self.known = tuple(dict.fromkeys(eps))
        elif len(self.known) < self.MAX_KNOWN:
            self.known = tuple(dict.fromkeys(self.known + tuple(eps)))
        self._set_state(Connectivity.READY)
        if self.pick_cache_ttl > 0:
            self._cached = tuple(eps)
            self._cache_until = now + self.pick_cache_ttl
            return None if policy is None else self._local(policy, self._cached)
        if policy is None:
            self._picks.extend(eps)
            return None
        if len(eps) > 1:
            self._picks.extend(eps[1:])
        first = eps[0]
        if first.address in self.ejected:
            return self._local(policy, self.known)
        return first


#: How long a ``wait_for_ready`` call waits between Resolves while the lookaside has no endpoint for it.
_READY_POLL = 0.05


class PerCallResolver(_PerCallCore):
    """Sync ``per_call`` mode: a blocking Resolve whenever no batched or cached pick is on hand."""

    def __init__(self, query: Query, calls: LookasideCalls, **kw: object) -> None:
        super().__init__(query, **kw)  # type: ignore[arg-type]
        self._calls = calls
        self._probe_lock = threading.Lock()
        self._probing = False
        self._stop = threading.Event()

    def pick(
        self,
        policy: RoutingPolicy,
        wait: float | None,
        wait_for_ready: bool,
        on_timeout: grpc.StatusCode,
        metadata: Metadata | None = None,
    ) -> Endpoint:
        deadline = None if wait is None else time.monotonic() + wait
        delay = _READY_POLL
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ep, rpc_wait = self._before(policy, left)
            if ep is not None:
                return ep
            try:
                resp = self._calls.resolve(
                    self._request(policy), timeout=rpc_wait, wait_for_ready=wait_for_ready or None
                )
            except grpc.RpcError as e:
                try:
                    return self._failed(e, policy, rpc_wait == left, on_timeout)
                except PickError as err:
                    if not wait_for_ready or err.code is not grpc.StatusCode.UNAVAILABLE:
                        raise
                    last: PickError = err
            else:
                try:
                    ep = self._take(resp, policy)
                    assert ep is not None
                    return ep
                except PickError as err:
                    if not wait_for_ready:
                        raise
                    last = err
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= delay:
                raise _timeout_error(on_timeout, f"a ready endpoint of {self.query}", last)
            time.sleep(delay)  # wait_for_ready: ask again until the target has a ready endpoint
            delay = min(delay * 2, 1.0)

    def connect(self) -> None:
        """Resolve in the background until the target has a ready endpoint (``try_to_connect``), with
        backoff, as a grpc channel reconnects; the picks serve the next calls."""
        with self._probe_lock:
            if self._probing or self._closed or self._state is Connectivity.READY:
                return
            self._probing = True
        if self._state is Connectivity.IDLE:
            self._set_state(Connectivity.CONNECTING)
        threading.Thread(target=self._probe, name=f"lookaside-connect-{self.query}", daemon=True).start()

    def _probe(self) -> None:
        backoff = Backoff()
        try:
            while not self._closed and self._state is not Connectivity.READY:
                try:
                    self._take(self._calls.resolve(self._request_any(), timeout=10.0), None)
                except (grpc.RpcError, PickError) as e:
                    log.debug("%s: connect Resolve failed: %s", self.query, e)
                    self._set_state(Connectivity.TRANSIENT_FAILURE)
                    self._stop.wait(backoff.next())
        finally:
            with self._probe_lock:
                self._probing = False

    def _request_any(self) -> protocol.Request:
        return self.query.resolve_request(protocol.ROUNDROBIN)

    def close(self) -> None:
        """Stop a connect probe."""
        self._closed = True
        self._stop.set()

    def join(self) -> None:
        """Nothing to wait for."""


class AioPerCallResolver(_PerCallCore):
    """Aio ``per_call`` mode: an awaited Resolve whenever no batched or cached pick is on hand."""

    def __init__(self, query: Query, calls: AioLookasideCalls, **kw: object) -> None:
        super().__init__(query, **kw)  # type: ignore[arg-type]
        self._calls = calls
        self._probe_task: asyncio.Task[None] | None = None

    async def pick(
        self,
        policy: RoutingPolicy,
        wait: float | None,
        wait_for_ready: bool,
        on_timeout: grpc.StatusCode,
        metadata: Metadata | None = None,
    ) -> Endpoint:
        deadline = None if wait is None else time.monotonic() + wait
        delay = _READY_POLL
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ep, rpc_wait = self._before(policy, left)
            if ep is not None:
                return ep
            try:
                resp = await self._calls.resolve(
                    self._request(policy), timeout=rpc_wait, wait_for_ready=wait_for_ready or None
                )
            except grpc.RpcError as e:
                try:
                    return self._failed(e, policy, rpc_wait == left, on_timeout)
                except PickError as err:
                    if not wait_for_ready or err.code is not grpc.StatusCode.UNAVAILABLE:
                        raise
                    last: PickError = err
            else:
                try:
                    ep = self._take(resp, policy)
                    assert ep is not None
                    return ep
                except PickError as err:
                    if not wait_for_ready:
                        raise
                    last = err
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= delay:
                raise _timeout_error(on_timeout, f"a ready endpoint of {self.query}", last)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def connect(self) -> None:
        """Resolve in a task until the target has a ready endpoint (``try_to_connect``), with backoff."""
        task = self._probe_task
        if (task is not None and not task.done()) or self._closed or self._state is Connectivity.READY:
            return
        if self._state is Connectivity.IDLE:
            self._set_state(Connectivity.CONNECTING)
        self._probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        backoff = Backoff()
        while not self._closed and self._state is not Connectivity.READY:
            try:
                resp = await self._calls.resolve(
                    self.query.resolve_request(protocol.ROUNDROBIN), timeout=10.0
                )
                self._take(resp, None)
            except (grpc.RpcError, PickError) as e:
                log.debug("%s: connect Resolve failed: %s", self.query, e)
                self._set_state(Connectivity.TRANSIENT_FAILURE)
                await asyncio.sleep(backoff.next())

    async def aclose(self) -> None:
        """Cancel a connect probe still running."""
        self._closed = True
        task, self._probe_task = self._probe_task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
