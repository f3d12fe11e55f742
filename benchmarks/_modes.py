"""The client modes compared: a registry of mode name -> client factory (imported by the client process).

To add a mode (e.g. an interceptor-based one), register a factory returning a ``grpc.Channel``::

    register("x", channel_mode(lambda ctx: grpc.intercept_channel(dial_round_robin(ctx.resolve()), I())))

or, for grpc.aio, ``register("aio_x", aio_channel_mode(async_factory))``. ``needs_lookaside=True`` marks
modes that are skipped when the lookaside client or server is not available.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from examples.greet import greet_pb2, greet_pb2_grpc

DIAL_TIMEOUT = 10.0


@dataclass
class Ctx:
    """What a factory may use to build its client."""

    backends: list[str]  # "127.0.0.1:PORT" of the backends at start
    lookaside: str | None = None  # "127.0.0.1:PORT" of the lookaside server
    service: str = "greet"
    namespace: str = "default"
    static_file: str | None = None  # the lookaside static file: round_robin redials "re-resolve" from it
    redial_every: int = 1000
    batch: int = 16
    policy: str = "round_robin"
    local_pool: bool = False  # give each round_robin channel its own connections
    xds_target: str = "xds:///greet.default"  # stock grpc xDS modes (bootstrap from the process env)

    def resolve(self) -> list[str]:
        """Current backend addresses: the static file (as headless-Service DNS would), else ``backends``."""
        if self.static_file:
            import yaml

            try:
                with open(self.static_file) as f:
                    data = yaml.safe_load(f) or {}
                eps = data.get(f"{self.namespace}/{self.service}") or []
                addrs = [f"{e['ip']}:{e['port']}" for e in eps]
                if addrs:
                    return addrs
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return list(self.backends)


@dataclass(frozen=True)
class Mode:
    kind: str  # "sync" or "aio"
    make: Callable[[Ctx], Any]  # sync: -> Caller; aio: async -> AioCaller
    needs_lookaside: bool = False
    needs_aio_lookaside: bool = False
    xds: bool = False  # the client process gets GRPC_XDS_BOOTSTRAP_CONFIG pointing at the lookaside (ADS)
    description: str = ""


MODES: dict[str, Mode] = {}


def register(name: str, mode: Mode) -> None:
    MODES[name] = mode


# ----------------------------------------------------------------------------------------------- callers


class Caller:
    """Sync: one channel, one Greet stub."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self._greet = greet_pb2_grpc.GreetServiceStub(channel).Greet

    def greet(self, request: greet_pb2.GreetingRequest, timeout: float) -> greet_pb2.GreetingResponse:
        return self._greet(request, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def info(self) -> dict[str, Any]:
        return {}


class AioCaller:
    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._greet = greet_pb2_grpc.GreetServiceStub(channel).Greet

    async def greet(self, request: greet_pb2.GreetingRequest, timeout: float) -> greet_pb2.GreetingResponse:
        return await self._greet(request, timeout=timeout)

    async def close(self) -> None:
        res = self.channel.close()
        if inspect.isawaitable(res):
            await res

    def info(self) -> dict[str, Any]:
        return {}


def channel_mode(factory: Callable[[Ctx], grpc.Channel], **kw: Any) -> Mode:
    return Mode("sync", lambda ctx: Caller(factory(ctx)), **kw)


def aio_channel_mode(factory: Callable[[Ctx], Awaitable[Any]], **kw: Any) -> Mode:
    async def make(ctx: Ctx) -> AioCaller:
        return AioCaller(await factory(ctx))

    return Mode("aio", make, **kw)


# ------------------------------------------------------------------------------------------- baselines


def rr_options(local_pool: bool) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [("grpc.lb_policy_name", "round_robin")]
    if local_pool:
        opts.append(("grpc.use_local_subchannel_pool", 1))
    return opts


def rr_target(addrs: list[str]) -> str:
    return "ipv4:" + ",".join(addrs)


def dial_round_robin(addrs: list[str], local_pool: bool = False) -> grpc.Channel:
    """C-core round_robin over a fixed list, dialled with a blocking wait (Go's WithBlock)."""
    ch = grpc.insecure_channel(rr_target(addrs), options=rr_options(local_pool))
    try:
        grpc.channel_ready_future(ch).result(timeout=DIAL_TIMEOUT)
    except BaseException:
        ch.close()
        raise
    return ch


def _direct(ctx: Ctx) -> grpc.Channel:
    ch = grpc.insecure_channel(ctx.backends[0])
    grpc.channel_ready_future(ch).result(timeout=DIAL_TIMEOUT)
    return ch


@dataclass
class _Gen:
    caller: Caller
    inflight: int = 0
    retired: bool = False
    closed: bool = False


@dataclass
class _RedialStats:
    redials: int = 0
    dial_s: float = 0.0
    close_s: float = 0.0
    max_close_s: float = 0.0
    closes: int = 0
    max_dial_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class RedialCaller:
    """round_robin re-dialled every ``ctx.redial_every`` calls (own subchannel pool: really new connections).

    The thread whose call hits the K-th count dials the new channel (blocking, others keep using the old
    one), swaps it in and re-resolves the addresses from the static file. The old channel is closed by
    whichever thread finishes its last in-flight call: that close (~200 ms right after a dial, FACTS) is
    paid by a worker thread and shows in latency and throughput, as it would in an application.
    """

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.every = max(1, ctx.redial_every)
        self._lock = threading.Lock()
        self._calls = 0
        self._redialing = False
        self.stats = _RedialStats()
        self._gen = _Gen(Caller(dial_round_robin(ctx.resolve(), local_pool=True)))

    def greet(self, request: greet_pb2.GreetingRequest, timeout: float) -> greet_pb2.GreetingResponse:
        with self._lock:
            self._calls += 1
            gen = self._gen
            gen.inflight += 1
            redial = self._calls % self.every == 0 and not self._redialing
            if redial:
                self._redialing = True
        try:
            return gen.caller.greet(request, timeout)
        finally:
            self._release(gen)
            if redial:
                self._redial()

    def _release(self, gen: _Gen) -> None:
        with self._lock:
            gen.inflight -= 1
            close = gen.retired and gen.inflight == 0 and not gen.closed
            if close:
                gen.closed = True
        if close:
            self._close(gen)

    def _close(self, gen: _Gen) -> None:
        t0 = time.monotonic()
        gen.caller.close()
        dt = time.monotonic() - t0
        with self._lock:
            self.stats.closes += 1
            self.stats.close_s += dt
            self.stats.max_close_s = max(self.stats.max_close_s, dt)

    def _redial(self) -> None:
        t0 = time.monotonic()
        try:
            new = _Gen(Caller(dial_round_robin(self.ctx.resolve(), local_pool=True)))
        except Exception:  # noqa: BLE001 - keep using the old channel
            with self._lock:
                self._redialing = False
            return
        dt = time.monotonic() - t0
        with self._lock:
            old, self._gen = self._gen, new
            old.retired = True
            close = old.inflight == 0 and not old.closed
            if close:
                old.closed = True
            self._redialing = False
            self.stats.redials += 1
            self.stats.dial_s += dt
            self.stats.max_dial_s = max(self.stats.max_dial_s, dt)
        if close:
            self._close(old)

    def close(self) -> None:
        with self._lock:
            gen = self._gen
            gen.closed = True
        gen.caller.close()

    def info(self) -> dict[str, Any]:
        s = self.stats
        return {
            "redials": s.redials,
            "redial_every": self.every,
            "dial_s_total": round(s.dial_s, 4),
            "dial_s_max": round(s.max_dial_s, 4),
            "close_s_total": round(s.close_s, 4),
            "close_s_max": round(s.max_close_s, 4),
            "closes": s.closes,
        }


async def _aio_round_robin(ctx: Ctx) -> Any:
    ch = grpc.aio.insecure_channel(rr_target(ctx.resolve()), options=rr_options(ctx.local_pool))
    import asyncio

    await asyncio.wait_for(ch.channel_ready(), DIAL_TIMEOUT)
    return ch


# ------------------------------------------------------------------------------------------- lookaside


def lookaside_available() -> tuple[bool, bool]:
    """(sync client present, aio client present)."""
    try:
        import lookaside_grpc
    except ImportError:
        return False, False
    sync = callable(getattr(lookaside_grpc, "channel", None))
    try:
        import lookaside_grpc.aio as la_aio

        aio = callable(getattr(la_aio, "channel", None))
    except ImportError:
        aio = False
    return sync, aio


def _lookaside(mode: str, batched: bool = False, policy: str | None = None) -> Callable[[Ctx], grpc.Channel]:
    def make(ctx: Ctx) -> grpc.Channel:
        import lookaside_grpc

        return lookaside_grpc.channel(
            ctx.service,
            namespace=ctx.namespace,
            lookaside=ctx.lookaside,
            mode=lookaside_grpc.PerCall(batch=ctx.batch) if batched else mode,  # type: ignore[arg-type]
            policy=policy or ctx.policy,
        )

    return make


def _aio_lookaside(mode: str) -> Callable[[Ctx], Awaitable[Any]]:
    async def make(ctx: Ctx) -> Any:
        import lookaside_grpc.aio

        ch = lookaside_grpc.aio.channel(
            ctx.service, namespace=ctx.namespace, lookaside=ctx.lookaside, mode=mode, policy=ctx.policy
        )
        if inspect.isawaitable(ch):
            ch = await ch
        return ch

    return make


register("direct", channel_mode(_direct, description="one channel to one backend"))
register(
    "round_robin",
    channel_mode(
        lambda ctx: dial_round_robin(ctx.resolve(), ctx.local_pool),
        description="C-core round_robin over a fixed ipv4: list, blocking dial",
    ),
)
register(
    "round_robin_redial",
    Mode("sync", RedialCaller, description="round_robin re-dialled every K calls, own subchannel pool"),
)
register(
    "lookaside_per_call",
    channel_mode(_lookaside("per_call"), needs_lookaside=True, description="one Resolve per call"),
)
register(
    "lookaside_per_call_batched",
    channel_mode(
        _lookaside("per_call", batched=True),
        needs_lookaside=True,
        description="one Resolve per `batch` calls",
    ),
)
register(
    "lookaside_watch",
    channel_mode(_lookaside("watch"), needs_lookaside=True, description="Watch stream, local rotation"),
)
for _policy, _what in (
    ("least_request", "power of two choices over this client's calls in flight"),
    ("peak_ewma", "power of two choices over latency EWMA x (in flight + 1)"),
    ("weighted", "weights from the load all clients report to the lookaside"),
):
    register(
        f"lookaside_watch_{_policy}",
        channel_mode(
            _lookaside("watch", policy=_policy), needs_lookaside=True, description=f"Watch mode, {_what}"
        ),
    )
register(
    "aio_round_robin",
    aio_channel_mode(_aio_round_robin, description="grpc.aio round_robin, blocking dial"),
)
register(
    "aio_lookaside_watch",
    aio_channel_mode(
        _aio_lookaside("watch"), needs_aio_lookaside=True, description="grpc.aio lookaside Watch mode"
    ),
)


# ------------------------------------------------------------------------------------------ interceptors


def _routes(ctx: Ctx) -> dict[str, Any]:
    import lookaside_grpc

    return {"greet.GreetService": lookaside_grpc.Target(ctx.service, ctx.namespace)}


class InterceptorCaller(Caller):
    """An application's existing channel (to one backend) wrapped by ``grpc.intercept_channel``."""

    def __init__(self, ctx: Ctx, mode: str) -> None:
        import lookaside_grpc

        self.interceptor = lookaside_grpc.LookasideInterceptor(
            lookaside=ctx.lookaside, routes=_routes(ctx), mode=mode, policy=ctx.policy
        )
        self.original = grpc.insecure_channel(ctx.backends[0])
        super().__init__(grpc.intercept_channel(self.original, self.interceptor))

    def close(self) -> None:
        self.interceptor.close()
        self.channel.close()

    def info(self) -> dict[str, Any]:
        st = self.interceptor.stats()
        return {"fallbacks": dict(st.fallbacks), "retries": st.retries, "resolves": st.resolves}


class AioInterceptorCaller(AioCaller):
    def __init__(self, ctx: Ctx, mode: str) -> None:
        import lookaside_grpc.aio

        self.interceptor = lookaside_grpc.aio.LookasideInterceptor(
            lookaside=ctx.lookaside, routes=_routes(ctx), mode=mode, policy=ctx.policy
        )
        super().__init__(
            grpc.aio.insecure_channel(ctx.backends[0], interceptors=self.interceptor.interceptors)
        )

    async def close(self) -> None:
        await self.interceptor.close()
        await self.channel.close()

    def info(self) -> dict[str, Any]:
        st = self.interceptor.stats()
        return {"fallbacks": dict(st.fallbacks), "retries": st.retries, "resolves": st.resolves}


async def _aio_interceptor(ctx: Ctx) -> AioInterceptorCaller:
    return AioInterceptorCaller(ctx, "watch")


for _mode in ("watch", "per_call"):
    register(
        f"interceptor_{_mode}",
        Mode(
            "sync",
            lambda ctx, _m=_mode: InterceptorCaller(ctx, _m),
            needs_lookaside=True,
            description=f"grpc.intercept_channel(one-backend channel, LookasideInterceptor(mode={_mode!r}))",
        ),
    )
register(
    "aio_interceptor_watch",
    Mode(
        "aio",
        _aio_interceptor,
        needs_aio_lookaside=True,
        description="grpc.aio channel with lookaside_grpc.aio.LookasideInterceptor(...).interceptors",
    ),
)


class _NoopInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Passes every call on unchanged: what grpc's interceptor machinery costs by itself."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, request)


class _AioNoopInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


async def _aio_noop_interceptor(ctx: Ctx) -> Any:
    import asyncio

    ch = grpc.aio.insecure_channel(
        rr_target(ctx.resolve()), options=rr_options(ctx.local_pool), interceptors=[_AioNoopInterceptor()]
    )
    await asyncio.wait_for(ch.channel_ready(), DIAL_TIMEOUT)
    return ch


register(
    "noop_interceptor",
    channel_mode(
        lambda ctx: grpc.intercept_channel(
            dial_round_robin(ctx.resolve(), ctx.local_pool), _NoopInterceptor()
        ),
        description="round_robin behind a do-nothing grpc interceptor: grpc's interceptor machinery alone",
    ),
)
register(
    "aio_noop_interceptor",
    aio_channel_mode(
        _aio_noop_interceptor,
        description="aio_round_robin with a do-nothing grpc.aio interceptor: grpc's machinery alone",
    ),
)

# ------------------------------------------------------------------------------------------ stock xDS


def _xds_options(ctx: Ctx) -> list[tuple[str, Any]]:
    return [("grpc.use_local_subchannel_pool", 1)] if ctx.local_pool else []


def _xds(ctx: Ctx) -> grpc.Channel:
    """Stock grpc, no lookaside_grpc code: ``xds:///greet.default`` with the lookaside as ADS server."""
    ch = grpc.insecure_channel(ctx.xds_target, options=_xds_options(ctx))
    if not ctx.local_pool:  # steady state: blocking dial like round_robin (small clients: first call waits)
        try:
            grpc.channel_ready_future(ch).result(timeout=DIAL_TIMEOUT)
        except BaseException:
            ch.close()
            raise
    return ch


async def _aio_xds(ctx: Ctx) -> Any:
    import asyncio

    ch = grpc.aio.insecure_channel(ctx.xds_target, options=_xds_options(ctx))
    await asyncio.wait_for(ch.channel_ready(), DIAL_TIMEOUT)
    return ch


register(
    "xds",
    channel_mode(
        _xds, needs_lookaside=True, xds=True, description="stock grpc xds:/// channel, lookaside ADS"
    ),
)
register(
    "aio_xds",
    aio_channel_mode(
        _aio_xds, needs_lookaside=True, xds=True, description="stock grpc.aio xds:/// channel, lookaside ADS"
    ),
)


# ------------------------------------------------------------------ lookaside_grpc's xds mode (C-core picks)


def _xds_mode(ctx: Ctx) -> grpc.Channel:
    """``lookaside_grpc.channel(mode="xds")``: the library bootstraps grpc's xDS client to the lookaside."""
    import lookaside_grpc

    ch = lookaside_grpc.channel(
        ctx.service, namespace=ctx.namespace, lookaside=ctx.lookaside, mode="xds", options=_xds_options(ctx)
    )
    if not ctx.local_pool:
        try:
            grpc.channel_ready_future(ch).result(timeout=DIAL_TIMEOUT)
        except BaseException:
            ch.close()
            raise
    return ch


async def _aio_xds_mode(ctx: Ctx) -> Any:
    import asyncio

    import lookaside_grpc.aio

    ch = lookaside_grpc.aio.channel(
        ctx.service, namespace=ctx.namespace, lookaside=ctx.lookaside, mode="xds", options=_xds_options(ctx)
    )
    await asyncio.wait_for(ch.channel_ready(), DIAL_TIMEOUT)
    return ch


register(
    "lookaside_xds_mode",
    channel_mode(
        _xds_mode,
        needs_lookaside=True,
        description="lookaside_grpc.channel(mode='xds'): grpc's xds:/// channel, library bootstrap",
    ),
)
register(
    "aio_lookaside_xds_mode",
    aio_channel_mode(
        _aio_xds_mode,
        needs_aio_lookaside=True,
        description="lookaside_grpc.aio.channel(mode='xds')",
    ),
)

#: The order modes are listed in tables (and the default set).
DEFAULT_MODES = list(MODES)
