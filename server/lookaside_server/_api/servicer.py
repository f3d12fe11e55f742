"""The one ``lookaside.Lookaside`` servicer (grpc.aio): Resolve picks, Watch streams, ReportLoad feeds the
load board and Status shows what the server tracks. Every RPC validates its target the same way first.

Watch sends pre-encoded messages: an endpoint set is encoded once per (target version, port, load weights)
and the same bytes go to every watcher, so :func:`add_to_server` registers Watch with no response
serializer (grpc sends the bytes as they are).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Iterable

import grpc

from lookaside_grpc import protocol as pb
from lookaside_server._api.load import LoadBoard, LoadLimits, ReportRefused
from lookaside_server._api.status import collect, to_proto
from lookaside_server._core.errors import abort, abort_invalid
from lookaside_server._core.model import BackendEndpoint, Target
from lookaside_server._core.ports import (
    MAX_COUNT,
    RoundRobin,
    UnknownPort,
    eligible,
    pick_random,
    select_port,
)
from lookaside_server._core.registry import Registry, TargetState
from lookaside_server._security.access import AccessPolicy
from lookaside_server._security.limits import MAX_TARGETS, peer_ip, record_hit
from lookaside_server._sources.base import SourceUnavailable, TargetNotFound, TooManyTargets

log = logging.getLogger(__name__)
#: Seconds between two WARNING lines about refused load reports of one client and limit.
REFUSAL_LOG_INTERVAL = 10.0
_ROUTERS = frozenset({pb.RANDOM, pb.ROUNDROBIN}) | pb.LOAD_ROUTERS


def _endpoint_msg(e: BackendEndpoint) -> pb.Endpoint:
    return pb.Endpoint(ip=e.ip, port=e.port, zone=e.zone, for_zones=e.for_zones, port_name=e.port_name)


def encode_endpoint_set(
    target: Target, version: int, endpoints: Iterable[BackendEndpoint], weights: dict[tuple[str, int], int]
) -> bytes:
    """The serialized ``EndpointSet`` of ``endpoints`` with their load weights (0 when unknown)."""
    msg = pb.EndpointSet(service=target.service, namespace=target.namespace, version=version)
    add = msg.endpoints.add
    for e in endpoints:
        weight = weights.get((e.ip, e.port), 0) if weights else 0
        if e.for_zones:
            add(
                ip=e.ip, port=e.port, zone=e.zone, for_zones=e.for_zones, port_name=e.port_name, weight=weight
            )
        else:  # (an empty repeated field argument costs as much as the rest of the endpoint)
            add(ip=e.ip, port=e.port, zone=e.zone, port_name=e.port_name, weight=weight)
    return msg.SerializeToString()


class LookasideServicer(pb.LookasideServicer):
    """Resolve with round-robin, random or load-aware picks; Watch with the eligible set on every change;
    ReportLoad into the :class:`LoadBoard`; Status from the registry."""

    def __init__(
        self,
        registry: Registry,
        rng: random.Random | None = None,
        allow_namespaces: frozenset[str] | None = None,
        access: AccessPolicy | None = None,
        load_limits: LoadLimits | None = None,
    ) -> None:
        self._registry = registry
        self._rr = RoundRobin()
        self._rng = rng or random.Random()
        #: Namespaces clients may resolve (None: any), whatever the source.
        self._allow_namespaces = allow_namespaces
        #: Namespace allow-list, per-namespace service rules (every target any RPC names is checked here).
        self._access = access if access is not None else AccessPolicy(allow_namespaces)
        #: Load reported by clients (ReportLoad), the weights derived from it and the load-aware pickers.
        self.load = LoadBoard(rng=self._rng, limits=load_limits)
        #: ReportLoad takes turns: one report aggregated per loop iteration.
        self._report_turn = asyncio.Lock()
        #: (limit, peer) -> (when a refusal was last logged, refusals not logged since).
        self._refusals_logged: dict[tuple[str, str], tuple[float, int]] = {}
        #: Targets with watchers -> how many; one weights listener per target resends to all of them.
        self._listening: dict[Target, int] = {}

    # --- validation -------------------------------------------------------------------------------------

    async def _target(self, service: str, namespace: str, context: grpc.aio.ServicerContext) -> Target:
        """The request's target, or INVALID_ARGUMENT naming the bad field; then the access rules."""
        try:
            target = Target(service, namespace)
        except pb.InvalidTarget as e:
            await abort_invalid(context, e.field, f"target {f'{service}.{namespace}'!r}: {e}")
        await self._access.check_target(context, target)
        return target

    @staticmethod
    async def _lookup_failed(target: Target, e: Exception, context: grpc.aio.ServicerContext) -> None:
        """Map a registry/source error to its status; return (to re-raise) if it is not a known one."""
        if isinstance(e, TargetNotFound):
            await abort(context, grpc.StatusCode.NOT_FOUND, f"target {target} not found")
        if isinstance(e, TooManyTargets):
            record_hit(MAX_TARGETS)
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        if isinstance(e, SourceUnavailable):
            await abort(context, grpc.StatusCode.UNAVAILABLE, f"target {target}: {e}")

    async def _state(self, target: Target, context: grpc.aio.ServicerContext) -> TargetState:
        try:
            return await self._registry.get(target)
        except (TargetNotFound, TooManyTargets, SourceUnavailable) as e:
            await self._lookup_failed(target, e, context)
            raise

    # --- Resolve ----------------------------------------------------------------------------------------

    async def Resolve(self, request: pb.Request, context: grpc.aio.ServicerContext) -> pb.Response:
        """Pick ``count`` backends of the chosen port (round robin shared by all clients, or random)."""
        target = await self._target(request.service, request.namespace, context)
        if request.router not in _ROUTERS:
            await abort_invalid(context, "router", f"target {target}: unknown router {request.router}")
        count = request.count or 1
        if count > MAX_COUNT:
            await abort_invalid(context, "count", f"target {target}: count {count} is above {MAX_COUNT}")
        state = await self._state(target, context)
        assert state.endpoints is not None
        try:
            key, chosen = select_port(state.endpoints, request.port)
        except UnknownPort as e:
            await abort_invalid(context, "port", f"target {target}: {e}")
        candidates = eligible(chosen)
        if not candidates:
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"target {target}: no ready endpoint for port {key!r} (version {state.version})",
            )
        if request.router == pb.ROUNDROBIN:
            picks = self._rr.pick(target, key, candidates, count)
        elif request.router in pb.LOAD_ROUTERS:
            picks = self.load.pick(target, request.router, candidates, count)
        else:
            picks = pick_random(candidates, count, self._rng)
        first = picks[0]
        return pb.Response(
            address=first.ip,
            port=first.port,
            endpoints=[_endpoint_msg(e) for e in picks],
            version=state.version,
        )

    # --- Watch ------------------------------------------------------------------------------------------

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Send the eligible set now and on every change until the client leaves or the server stops.

        Yields serialized ``EndpointSet`` messages (see :func:`add_to_server`), shared by every watcher of
        the same target, port and version."""
        target = await self._target(request.service, request.namespace, context)
        try:
            sub = await self._registry.watch(target)
        except (TargetNotFound, TooManyTargets, SourceUnavailable) as e:
            await self._lookup_failed(target, e, context)
            raise
        with sub:
            state = await sub.next()
            if state is None:
                return
            assert state.endpoints is not None
            try:
                select_port(state.endpoints, request.port)
                port = pb.canonical_port(request.port)  # the cache key: every spelling shares it
            except (UnknownPort, pb.InvalidTarget) as e:
                await abort_invalid(context, "port", f"target {target}: {e}")
            self._listen(target)
            try:
                while state is not None:
                    yield self._encoded(target, state, port)
                    state = await sub.next()
            finally:
                self._unlisten(target)
        log.debug("watch on %s ended", target)

    def _listen(self, target: Target) -> None:
        n = self._listening.get(target, 0)
        self._listening[target] = n + 1
        if n == 0:
            self.load.listen(target, self._weights_changed(target))

    def _unlisten(self, target: Target) -> None:
        n = self._listening.get(target, 0) - 1
        if n > 0:
            self._listening[target] = n
            return
        self._listening.pop(target, None)
        self.load.unlisten(target, self._weights_changed(target))

    def _weights_changed(self, target: Target) -> _Resend:
        return _Resend(self._registry, target)

    def _encoded(self, target: Target, state: TargetState, port: str) -> bytes:
        """The serialized eligible set of ``port`` at ``state`` with the current weights, encoded once and
        kept in the state's cache (the previous weights' encoding of that port is dropped)."""
        weights_version = self.load.weights_version(target)
        cache = state.cache
        key = ("watch", port, weights_version)
        data = cache.get(key)
        if data is None:
            endpoints: Iterable[BackendEndpoint] = ()
            if state.endpoints:
                try:
                    endpoints = eligible(select_port(state.endpoints, port)[1])
                except UnknownPort:
                    endpoints = ()
            data = encode_endpoint_set(target, state.version, endpoints, self.load.weights(target))
            for old in [k for k in cache if k[:2] == ("watch", port)]:
                del cache[old]
            cache[key] = data
        return data

    # --- ReportLoad -------------------------------------------------------------------------------------

    async def ReportLoad(self, request: pb.LoadReport, context: grpc.aio.ServicerContext) -> pb.LoadReportAck:
        """Record one client's load on a target (aggregated into weights and the load-aware Resolve); the
        target must exist (NOT_FOUND), the report stay within the board's limits (RESOURCE_EXHAUSTED)."""
        target = await self._target(request.service, request.namespace, context)
        if not request.client_id:
            await abort_invalid(context, "client_id", f"target {target}: client_id must be set")
        if len(request.client_id) > 256:
            await abort_invalid(
                context, "client_id", f"target {target}: client_id is longer than 256 characters"
            )
        state = await self._state(target, context)
        peer = peer_ip(context.peer())
        try:
            # refused before waiting for a turn; the report checks again in its turn
            self.load.take_report_token(target, peer)
            self.load.admit(target, request.client_id, len(request.endpoints), peer)
            async with self._report_turn:  # one report per loop iteration: a flood never stalls the loop
                await asyncio.sleep(0)
                self.load.report(
                    target,
                    request.client_id,
                    request.interval_ms / 1000.0,
                    request.endpoints,
                    peer=peer,
                    endpoints=state.endpoints,
                )
        except ReportRefused as e:
            record_hit(e.limit)
            self._log_refusal(e.limit, peer, str(e))
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        return pb.LoadReportAck(interval_ms=int(self.load.report_interval * 1000))

    def _log_refusal(self, limit: str, peer: str, message: str) -> None:
        """Log a refused report at WARNING at most once per limit and peer per REFUSAL_LOG_INTERVAL (a flood
        must not flood the log too); every refusal is counted in ``lookaside_limit_hits_total``."""
        now = time.monotonic()
        key = (limit, peer)
        last, skipped = self._refusals_logged.get(key, (float("-inf"), 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._refusals_logged[key] = (last, skipped + 1)
            return
        if len(self._refusals_logged) >= 1024:
            self._refusals_logged.clear()
        self._refusals_logged[key] = (now, 0)
        more = f" ({skipped} more from this client since the last such line)" if skipped else ""
        log.warning("limit %s reached: %s%s", limit, message, more)

    # --- Status -----------------------------------------------------------------------------------------

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        """Every tracked target (or the one asked for) with endpoints, watchers and source health."""
        only = None
        if request.service or request.namespace:
            # The same checks as Resolve/Watch: names, then the namespace allow-list.
            only = await self._target(request.service, request.namespace, context)
        view = collect(self._registry, only)
        if only is not None and not view.targets:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"target {only} is not tracked: no client has resolved or watched it yet",
            )
        return to_proto(view)


class _Resend:
    """The weights listener of one target: resend the current set to all its watchers. Equal per target, so
    ``unlisten`` finds the one ``listen`` added."""

    __slots__ = ("registry", "target")

    def __init__(self, registry: Registry, target: Target) -> None:
        self.registry = registry
        self.target = target

    def __call__(self) -> None:
        self.registry.resend_all(self.target)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Resend) and other.registry is self.registry and other.target == self.target

    def __hash__(self) -> int:
        return hash(self.target)


def add_to_server(servicer: LookasideServicer, server: grpc.aio.Server) -> None:
    """Serve ``servicer`` on ``server``: like ``protocol.add_LookasideServicer_to_server``, except that Watch
    responses are already serialized (shared bytes, not one encoding per watcher)."""
    handlers = {
        "Resolve": grpc.unary_unary_rpc_method_handler(
            servicer.Resolve,
            request_deserializer=pb.Request.FromString,
            response_serializer=pb.Response.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch, request_deserializer=pb.WatchRequest.FromString, response_serializer=None
        ),  # bytes as they are
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status,
            request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusResponse.SerializeToString,
        ),
        "ReportLoad": grpc.unary_unary_rpc_method_handler(
            servicer.ReportLoad,
            request_deserializer=pb.LoadReport.FromString,
            response_serializer=pb.LoadReportAck.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.SERVICE_NAME, handlers),))
