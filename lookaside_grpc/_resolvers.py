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
from lookaside_grpc._policies import RoutingPolicy

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
        port = resp.port or (int(self.port) if self.port.isdigit() else 0)
        return [Endpoint(resp.address, port)] if port else []


class Backoff:
    """Exponential reconnect delay with jitter, reset once a stream delivers."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0, factor: float = 1.6) -> None:
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
    def close(self) -> None: ...


class AioResolver(Protocol):
    """How an aio balancer gets endpoints."""

    target: Target

    def pick_nowait(self, policy: RoutingPolicy) -> Endpoint | None: ...
    async def pick(self, policy: RoutingPolicy, timeout: float | None) -> Endpoint: ...
    async def aclose(self) -> None: ...


#: Called with the addresses of every endpoint set received (the pool retires the others).
OnChange = Callable[[set[str]], None]


class _WatchCore:
    """State handling shared by the sync and aio watch resolvers."""

    def __init__(self, target: Target, stub: Any, on_change: OnChange, init_timeout: float) -> None:
        self.target = target
        self.state = EndpointState()
        self._stub = stub
        self._on_change = on_change
        self._init_timeout = init_timeout
        self._closed = False

    def _apply(self, es: protocol.EndpointSet) -> None:
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

    def _broken(self, err: PickError, backoff: float) -> None:
        self.state.error = err
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

    def __init__(self, target: Target, stub: Any, on_change: OnChange, init_timeout: float) -> None:
        super().__init__(target, stub, on_change, init_timeout)
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
                err = PickError(grpc.StatusCode.UNAVAILABLE, "the lookaside ended the Watch stream")
            except grpc.RpcError as e:
                if self._stop.is_set():
                    break
                err = from_lookaside_error(e, str(self.target), self.target.lookaside)
            except Exception as e:  # keep watching whatever happens
                log.exception("%s: Watch failed", self.target)
                err = PickError(grpc.StatusCode.UNAVAILABLE, f"Watch failed: {e!r}")
            delay = backoff.next()
            self._broken(err, delay)
            self._notify()
            self._stop.wait(delay)
        log.debug("%s: watch thread stopped", self.target)

    def close(self) -> None:
        """Stop the stream and join the thread."""
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

    def __init__(self, target: Target, stub: Any, on_change: OnChange, init_timeout: float) -> None:
        super().__init__(target, stub, on_change, init_timeout)
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
                err = PickError(grpc.StatusCode.UNAVAILABLE, "the lookaside ended the Watch stream")
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as e:
                err = from_lookaside_error(e, str(self.target), self.target.lookaside)
            except Exception as e:  # keep watching whatever happens
                log.exception("%s: Watch failed", self.target)
                err = PickError(grpc.StatusCode.UNAVAILABLE, f"Watch failed: {e!r}")
            delay = backoff.next()
            self._broken(err, delay)
            self._notify()
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        """Cancel the watch task and wait for it."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._notify()


class _PerCallCore:
    """Shared ``per_call`` logic: the request and the queue of batched picks not used yet."""

    def __init__(self, target: Target, stub: Any, init_timeout: float) -> None:
        self.target = target
        self._stub = stub
        self._init_timeout = init_timeout
        self._picks: deque[Endpoint] = deque()
        self._requests: dict[int, protocol.Request] = {}

    def _request(self, policy: RoutingPolicy) -> protocol.Request:
        req = self._requests.get(policy.router_type)
        if req is None:
            req = self._requests[policy.router_type] = self.target.resolve_request(policy.router_type)
        return req

    def pick_nowait(self, policy: RoutingPolicy) -> Endpoint | None:
        """A pick left over from the last batch, if any."""
        if self._picks:
            try:
                return self._picks.popleft()
            except IndexError:
                return None
        return None

    def _take(self, resp: protocol.Response) -> Endpoint:
        eps = self.target.endpoints_from_response(resp)
        if not eps:
            raise PickError(
                grpc.StatusCode.UNAVAILABLE, f"the lookaside returned no endpoint for {self.target}"
            )
        if len(eps) > 1:
            self._picks.extend(eps[1:])
        return eps[0]

    def _failed(self, err: grpc.RpcError) -> PickError:
        return from_lookaside_error(err, str(self.target), self.target.lookaside)


class PerCallResolver(_PerCallCore):
    """Sync ``per_call`` mode: a blocking Resolve whenever no batched pick is on hand."""

    def pick(self, policy: RoutingPolicy, timeout: float | None) -> Endpoint:
        ep = self.pick_nowait(policy)
        if ep is not None:
            return ep
        try:
            resp = self._stub.Resolve(
                self._request(policy), timeout=self._init_timeout if timeout is None else timeout
            )
        except grpc.RpcError as e:
            raise self._failed(e) from None
        return self._take(resp)

    def close(self) -> None:
        """Nothing runs in the background."""


class AioPerCallResolver(_PerCallCore):
    """Aio ``per_call`` mode: an awaited Resolve whenever no batched pick is on hand."""

    async def pick(self, policy: RoutingPolicy, timeout: float | None) -> Endpoint:
        ep = self.pick_nowait(policy)
        if ep is not None:
            return ep
        try:
            resp = await self._stub.Resolve(
                self._request(policy), timeout=self._init_timeout if timeout is None else timeout
            )
        except grpc.RpcError as e:
            raise self._failed(e) from None
        return self._take(resp)

    async def aclose(self) -> None:
        """Nothing runs in the background."""
