"""The ``lookaside.Lookaside`` servicer (grpc.aio): validates, then Resolve picks and Watch streams."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Iterable

import grpc

from lookaside_grpc import protocol as pb
from lookaside_server._api.load import LoadBoard
from lookaside_server._core.errors import abort, abort_invalid
from lookaside_server._core.model import BackendEndpoint, Target
from lookaside_server._core.names import namespace_problem, service_problem
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
from lookaside_server._security.limits import MAX_TARGETS, record_hit
from lookaside_server._sources.base import SourceUnavailable, TargetNotFound, TooManyTargets

log = logging.getLogger(__name__)
_ROUTERS = frozenset({pb.RANDOM, pb.ROUNDROBIN}) | pb.LOAD_ROUTERS


def _endpoint_msg(e: BackendEndpoint, weight: int = 0) -> pb.Endpoint:
    return pb.Endpoint(ip=e.ip, port=e.port, zone=e.zone, for_zones=e.for_zones, port_name=e.port_name,
                       weight=weight)


class LookasideServicer(pb.LookasideServicer):
    """Answers Resolve with round-robin or random picks and Watch with the eligible set on every change."""

    def __init__(self, registry: Registry, rng: random.Random | None = None,
                 allow_namespaces: frozenset[str] | None = None, access: AccessPolicy | None = None) -> None:
        self._registry = registry
        self._rr = RoundRobin()
        self._rng = rng or random.Random()
        #: Namespaces clients may resolve (None: any), whatever the source.
        self._allow_namespaces = allow_namespaces
        #: Namespace allow-list, per-namespace service rules (every target any RPC names is checked here).
        self._access = access if access is not None else AccessPolicy(allow_namespaces)
        #: Load reported by clients (ReportLoad), the weights derived from it and the load-aware pickers.
        self.load = LoadBoard(rng=self._rng)

    async def _target(self, service: str, namespace: str, context: grpc.aio.ServicerContext) -> Target:
        name = f"{service}.{namespace}"
        if problem := service_problem(service):
            await abort_invalid(context, "service", f"target {name!r}: service {problem}")
        if problem := namespace_problem(namespace):
            await abort_invalid(context, "namespace", f"target {name!r}: namespace {problem}")
        target = Target(service, namespace)
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
            await abort(context, grpc.StatusCode.UNAVAILABLE,
                        f"target {target}: no ready endpoint for port {key!r} (version {state.version})")
        if request.router == pb.ROUNDROBIN:
            picks = self._rr.pick(target, key, candidates, count)
        elif request.router in pb.LOAD_ROUTERS:
            picks = self.load.pick(target, request.router, candidates, count)
        else:
            picks = pick_random(candidates, count, self._rng)
        first = picks[0]
        return pb.Response(address=first.ip, port=first.port, endpoints=[_endpoint_msg(e) for e in picks],
                           version=state.version)

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[pb.EndpointSet]:
        """Send the eligible set now and on every change until the client leaves or the server stops."""
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
            except UnknownPort as e:
                await abort_invalid(context, "port", f"target {target}: {e}")
            sent = [state]

            def weights_changed() -> None:  # the same set again, with the new weights
                sub.resend(sent[0])

            self.load.listen(target, weights_changed)
            try:
                while state is not None:
                    sent[0] = state
                    yield self._endpoint_set(target, state, request.port)
                    state = await sub.next()
            finally:
                self.load.unlisten(target, weights_changed)
        log.debug("watch on %s ended", target)

    def _endpoint_set(self, target: Target, state: TargetState, port: str) -> pb.EndpointSet:
        endpoints: Iterable[BackendEndpoint] = ()
        if state.endpoints:
            try:
                endpoints = eligible(select_port(state.endpoints, port)[1])
            except UnknownPort:
                endpoints = ()
        weights = self.load.weights(target)
        return pb.EndpointSet(service=target.service, namespace=target.namespace,
                              endpoints=[_endpoint_msg(e, weights.get((e.ip, e.port), 0)) for e in endpoints],
                              version=state.version)

    async def ReportLoad(self, request: pb.LoadReport, context: grpc.aio.ServicerContext) -> pb.LoadReportAck:
        """Record one client's load on a target (aggregated into weights and the load-aware Resolve)."""
        target = await self._target(request.service, request.namespace, context)
        if not request.client_id:
            await abort_invalid(context, "client_id", f"target {target}: client_id must be set")
        self.load.report(target, request.client_id, request.interval_ms / 1000.0, request.endpoints)
        return pb.LoadReportAck(interval_ms=int(self.load.report_interval * 1000))

