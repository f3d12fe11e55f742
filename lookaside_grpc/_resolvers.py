"""Resolution modes behind one interface: ``pick_nowait(policy)`` (hot path) and ``pick(policy, timeout)``.

``per_call``: one lookaside ``Resolve`` per call as in the original design (``batch`` > 1 asks for that many
picks at once and serves them in order). ``watch``: one background ``Watch`` stream per target keeps the local
endpoint set; calls pick locally with the policy, with no extra round trip. Sync resolvers use a daemon thread
and blocking stubs, aio resolvers a task and grpc.aio stubs; everything else here is shared.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import grpc
import grpc.aio

from lookaside_grpc import protocol
from lookaside_grpc._endpoints import Endpoint, EndpointState
from lookaside_grpc._errors import CALLER_ERRORS, PickError, from_lookaside_error
from lookaside_grpc._health import AdaptiveThrottle
from lookaside_grpc._policies import RoutingPolicy
from lookaside_grpc._stats import LOCAL_ROTATION, STALE, THROTTLED, Counters

log = logging.getLogger(__name__)

Mode = Literal["watch", "per_call"]
WATCH: Mode = "watch"
PER_CALL: Mode = "per_call"
MODES: tuple[Mode, ...] = (WATCH, PER_CALL)


@dataclass(frozen=True, slots=True)
class Target:
    """What to resolve (a Kubernetes Service port) and where (the lookaside address)."""

    service: str
    namespace: str
    port: str
    lookaside: str
    batch: int = 1

    def __str__(self) -> str:
        return f"{self.service}.{self.namespace}" + (f":{self.port}" if self.port else "")

    def resolve_request(self, router_type: int) -> protocol.Request:
        """The Resolve request for one call (or one batch of picks)."""
        return protocol.Request(
            router=router_type,  # type: ignore[arg-type]
            service=self.service,
            namespace=self.namespace,
            port=self.port,
            count=self.batch,
        )

    def watch_request(self) -> protocol.WatchRequest:
        """The Watch request for this target."""
        return protocol.WatchRequest(service=self.service, namespace=self.namespace, port=self.port)

    def endpoints_from_response(self, resp: protocol.Response) -> list[Endpoint]:
        """The picks of a Resolve response; an original-style answer (address only) uses ``port``."""
        if resp.endpoints:
            return [Endpoint.from_proto(e) for e in resp.endpoints]
        if not resp.address:
            return []
        port = resp.port or (int(self.port) if self.port.isascii() and self.port.isdigit() else 0)
        return [Endpoint(resp.address, port)] if port else []


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


class SyncResolver(Protocol):
    """How a sync balancer gets endpoints."""

    target: Target

    def pick_nowait(self, policy: RoutingPolicy) -> Endpoint | None: ...
    def pick(self, policy: RoutingPolicy, timeout: float | None) -> Endpoint: ...
    def set_ejected(self, ejected: frozenset[str]) -> None: ...
    def population(self) -> int: ...
    def candidates(self) -> tuple[Endpoint, ...]: ...
    def close(self) -> None: ...


class AioResolver(Protocol):
    """How an aio balancer gets endpoints."""

    target: Target

    def pick_nowait(self, policy: RoutingPolicy) -> Endpoint | None: ...
    async def pick(self, policy: RoutingPolicy, timeout: float | None) -> Endpoint: ...
    def set_ejected(self, ejected: frozenset[str]) -> None: ...
    def population(self) -> int: ...
    def candidates(self) -> tuple[Endpoint, ...]: ...
    async def aclose(self) -> None: ...


#: Called with the addresses of every endpoint set received (the pool retires the others).
OnChange = Callable[[set[str]], None]


class _WatchCore:
    """State handling shared by the sync and aio watch resolvers.

    While the Watch stream is up, the set is confirmed continuously; once it breaks, the last set keeps
    serving for ``max_staleness`` seconds (None = forever), then the set is marked stale (a timer, nothing
    is checked per call) and picks fail with UNAVAILABLE (channels) or fall back (interceptors).
    """

    def __init__(
        self,
        target: Target,
        stub: Any,
        on_change: OnChange,
        init_timeout: float,
        *,
        max_staleness: float | None = None,
        counters: Counters | None = None,
    ) -> None:
        self.target = target
        self.state = EndpointState()
        self._stub = stub
        self._on_change = on_change
        self._init_timeout = init_timeout
        self._closed = False
        self.max_staleness = max_staleness
        self._counters = counters or Counters()
        #: monotonic time the stream broke (None while it is up and has delivered a set).
        self._broken_since: float | None = None
        self._stale_timer: threading.Timer | None = None
        self._stale_lock = threading.Lock()

    def set_ejected(self, ejected: frozenset[str]) -> None:
        self.state.set_ejected(ejected)

    def population(self) -> int:
        return len(self.state.full)

    def candidates(self) -> tuple[Endpoint, ...]:
        """The known set to pick a retry from (empty once stale)."""
        state = self.state
        return () if state.stale else state.full

    def _start_stale_timer(self, delay: float) -> None:
        with self._stale_lock:
            if self._closed or self._stale_timer is not None:
                return
            timer = self._stale_timer = threading.Timer(max(0.0, delay), self._check_stale)
            timer.daemon = True
            timer.start()

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
                self.target,
                self.target.lookaside,
                self.max_staleness,
            )
            self.state.expire()

    def _cancel_stale_timer(self) -> None:
        with self._stale_lock:
            timer, self._stale_timer = self._stale_timer, None
        if timer is not None:
            timer.cancel()

    def _apply(self, es: protocol.EndpointSet) -> None:
        self._broken_since = None
        added, removed = self.state.update((Endpoint.from_proto(e) for e in es.endpoints), es.version)
        if added or removed:
            log.info(
                "%s: endpoint set v%d: %d endpoints (+%d -%d)",
                self.target,
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
            return from_lookaside_error(err, str(self.target), self.target.lookaside)
        log.exception("%s: Watch failed", self.target)  # keep watching whatever happens
        return PickError(grpc.StatusCode.UNAVAILABLE, f"Watch failed: {err!r}")

    def _broken(self, err: PickError, backoff: float) -> None:
        self.state.error = err
        if self._broken_since is None:
            self._broken_since = time.monotonic()
            if self.max_staleness is not None and self.state.received:
                self._start_stale_timer(self.max_staleness)
        log.warning(
            "%s: Watch on lookaside %s broke (%s); retrying in %.2fs, keeping %d endpoints",
            self.target,
            self.target.lookaside,
            err,
            backoff,
            len(self.state.endpoints),
        )

    def _ready(self, policy: RoutingPolicy) -> Endpoint | None:
        """A pick if a set is known; raise if it is empty or the lookaside rejected the target."""
        state = self.state
        if state.received:
            eps = state.endpoints
            if eps:
                return policy.pick(eps)
            if state.stale:
                raise PickError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the endpoint set of {self.target} is stale: lookaside {self.target.lookaside} has not "
                    f"confirmed it for more than {self.max_staleness}s; last error: {state.error}",
                    reason=STALE,
                )
            raise PickError(grpc.StatusCode.UNAVAILABLE, f"no endpoints for {self.target}: the set is empty")
        err = state.error
        if isinstance(err, PickError) and err.code in CALLER_ERRORS:
            raise err
        return None

    def _timed_out(self, waited: float) -> PickError:
        last = f"; last error: {self.state.error}" if self.state.error else ""
        return PickError(
            grpc.StatusCode.UNAVAILABLE,
            f"no endpoint set for {self.target} from lookaside {self.target.lookaside} "
            f"within {waited:.3g}s{last}",
        )

    def pick_nowait(self, policy: RoutingPolicy) -> Endpoint | None:
        """The hot path: pick from the known set, no I/O."""
        eps = self.state.endpoints
        return policy.pick(eps) if eps else None


class WatchResolver(_WatchCore):
    """Sync ``watch`` mode: a daemon thread follows the Watch stream and reconnects with backoff."""

    def __init__(
        self, target: Target, stub: Any, on_change: OnChange, init_timeout: float, **kw: Any
    ) -> None:
        super().__init__(target, stub, on_change, init_timeout, **kw)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name=f"lookaside-watch-{target}", daemon=True)
        self._thread.start()

    def pick(self, policy: RoutingPolicy, timeout: float | None) -> Endpoint:
        """Wait for the first set up to ``timeout`` (or the init timeout), then pick."""
        waited = self._init_timeout if timeout is None else timeout
        deadline = time.monotonic() + waited
        with self._cond:
            while True:
                ep = self._ready(policy)
                if ep is not None:
                    return ep
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    raise self._timed_out(waited)
                self._cond.wait(remaining)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        request = self.target.watch_request()
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                call = self._stub.Watch(request)
                with self._cond:
                    self._call = call
                if self._stop.is_set():
                    call.cancel()
                    break
                for es in call:
                    backoff.reset()
                    self._apply(es)
                    self._notify()
                err = self._watch_error(None)
            except Exception as e:
                if self._stop.is_set() and isinstance(e, grpc.RpcError):
                    break
                err = self._watch_error(e)
            delay = backoff.next()
            self._broken(err, delay)
            self._notify()
            self._stop.wait(delay)
        log.debug("%s: watch thread stopped", self.target)

    def close(self) -> None:
        """Stop the stream and join the thread."""
        self._closed = True
        self._cancel_stale_timer()
        self._stop.set()
        with self._cond:
            call = self._call
            self._cond.notify_all()
        if call is not None:
            call.cancel()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


class AioWatchResolver(_WatchCore):
    """Aio ``watch`` mode: a task follows the Watch stream; started on first use inside the event loop."""

    def __init__(
        self, target: Target, stub: Any, on_change: OnChange, init_timeout: float, **kw: Any
    ) -> None:
        super().__init__(target, stub, on_change, init_timeout, **kw)
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._start()

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"lookaside-watch-{self.target}"
            )

    def pick_nowait(self, policy: RoutingPolicy) -> Endpoint | None:
        eps = self.state.endpoints
        if eps:
            return policy.pick(eps)
        if self._task is None:
            self._start()
        return None

    async def pick(self, policy: RoutingPolicy, timeout: float | None) -> Endpoint:
        """Wait for the first set up to ``timeout`` (or the init timeout), then pick."""
        self._start()
        waited = self._init_timeout if timeout is None else timeout
        deadline = time.monotonic() + waited
        while True:
            changed = self._changed
            ep = self._ready(policy)
            if ep is not None:
                return ep
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                raise self._timed_out(waited)
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(self) -> None:
        request = self.target.watch_request()
        backoff = Backoff()
        while True:
            try:
                call = self._stub.Watch(request)
                async for es in call:
                    backoff.reset()
                    self._apply(es)
                    self._notify()
                err = self._watch_error(None)
            except Exception as e:  # cancellation is no Exception: it ends the task
                err = self._watch_error(e)
            delay = backoff.next()
            self._broken(err, delay)
            self._notify()
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
        self._notify()


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
        target: Target,
        stub: Any,
        init_timeout: float,
        *,
        max_staleness: float | None = None,
        counters: Counters | None = None,
        pick_cache_ttl: float = 0.0,
        throttle: bool | AdaptiveThrottle = True,
    ) -> None:
        self.target = target
        self._stub = stub
        self._init_timeout = init_timeout
        self._picks: deque[Endpoint] = deque()
        self._requests: dict[int, protocol.Request] = {}
        self.max_staleness = max_staleness
        self._counters = counters or Counters()
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

    def set_ejected(self, ejected: frozenset[str]) -> None:
        self.ejected = ejected

    def population(self) -> int:
        return len(self.known)

    def candidates(self) -> tuple[Endpoint, ...]:
        """The known set to pick a retry from (empty once stale)."""
        return self._fresh_known()

    def _request(self, policy: RoutingPolicy) -> protocol.Request:
        req = self._requests.get(policy.router_type)
        if req is None:
            req = self._requests[policy.router_type] = self.target.resolve_request(policy.router_type)
        return req

    def _local(self, policy: RoutingPolicy, eps: tuple[Endpoint, ...]) -> Endpoint:
        ejected = self.ejected
        if ejected:
            eligible = tuple(e for e in eps if e.address not in ejected)
            return policy.pick(eligible or eps)
        return policy.pick(eps)

    def pick_nowait(self, policy: RoutingPolicy) -> Endpoint | None:
        """A pick left over from the last batch, or from the pick cache, if any."""
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

    def _before(self, policy: RoutingPolicy, timeout: float | None) -> tuple[Endpoint | None, float]:
        """A pick on hand (batched or cached) or a local one if the Resolve is throttled; else None and how
        long the Resolve may take."""
        ep = self.pick_nowait(policy)
        if ep is not None:
            return ep, 0.0
        known = self._fresh_known()
        if known and self.throttler is not None and self.throttler.throttle():
            self._counters.fallback(THROTTLED)
            return self._local(policy, known), 0.0
        wait = self._init_timeout if timeout is None else timeout
        if known:  # leave the call time to go elsewhere if the lookaside does not answer
            wait *= 0.5
        return None, wait

    def _failed(self, err: grpc.RpcError, policy: RoutingPolicy) -> Endpoint:
        self._counters.resolve(False)
        if self.throttler is not None:
            self.throttler.record(False)
        error = from_lookaside_error(err, str(self.target), self.target.lookaside)
        if error.code in CALLER_ERRORS:
            raise error
        known = self._fresh_known()
        if known:
            self._counters.fallback(LOCAL_ROTATION)
            return self._local(policy, known)
        if self.known:
            error.reason = STALE
            error.details += f" (last known set older than max_staleness={self.max_staleness}s)"
        raise error

    def _take(self, resp: protocol.Response, policy: RoutingPolicy) -> Endpoint:
        self._counters.resolve(True)
        if self.throttler is not None:
            self.throttler.record(True)
        eps = self.target.endpoints_from_response(resp)
        if not eps:
            raise PickError(
                grpc.StatusCode.UNAVAILABLE, f"the lookaside returned no endpoint for {self.target}"
            )
        now = time.monotonic()
        self._last_ok = now
        if resp.version != self._known_version or not self.known:
            self._known_version = resp.version
            self.known = tuple(dict.fromkeys(eps))
        elif len(self.known) < self.MAX_KNOWN:
            self.known = tuple(dict.fromkeys(self.known + tuple(eps)))
        if self.pick_cache_ttl > 0:
            self._cached = tuple(eps)
            self._cache_until = now + self.pick_cache_ttl
            return self._local(policy, self._cached)
        if len(eps) > 1:
            self._picks.extend(eps[1:])
        first = eps[0]
        if first.address in self.ejected:
            return self._local(policy, self.known)
        return first


class PerCallResolver(_PerCallCore):
    """Sync ``per_call`` mode: a blocking Resolve whenever no batched or cached pick is on hand."""

    def pick(self, policy: RoutingPolicy, timeout: float | None) -> Endpoint:
        ep, wait = self._before(policy, timeout)
        if ep is not None:
            return ep
        try:
            resp = self._stub.Resolve(self._request(policy), timeout=wait)
        except grpc.RpcError as e:
            return self._failed(e, policy)
        return self._take(resp, policy)

    def close(self) -> None:
        """Nothing runs in the background."""


class AioPerCallResolver(_PerCallCore):
    """Aio ``per_call`` mode: an awaited Resolve whenever no batched or cached pick is on hand."""

    async def pick(self, policy: RoutingPolicy, timeout: float | None) -> Endpoint:
        ep, wait = self._before(policy, timeout)
        if ep is not None:
            return ep
        try:
            resp = await self._stub.Resolve(self._request(policy), timeout=wait)
        except grpc.RpcError as e:
            return self._failed(e, policy)
        return self._take(resp, policy)

    async def aclose(self) -> None:
        """Nothing runs in the background."""
