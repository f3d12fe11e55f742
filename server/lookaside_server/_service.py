"""The ``lookaside.Lookaside`` servicer (grpc.aio): validates, then Resolve picks and Watch streams."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Iterable

import grpc

from lookaside_grpc import protocol as pb
from lookaside_server._errors import abort, abort_invalid
from lookaside_server._model import BackendEndpoint, Target
from lookaside_server._names import namespace_problem, service_problem
from lookaside_server._registry import Registry, TargetState
from lookaside_server._routing import MAX_COUNT, RoundRobin, UnknownPort, eligible, pick_random, select_port
from lookaside_server._source import SourceUnavailable, TargetNotFound, TooManyTargets

log = logging.getLogger(__name__)
_ROUTERS = frozenset({pb.RANDOM, pb.ROUNDROBIN})


def _endpoint_msg(e: BackendEndpoint) -> pb.Endpoint:
    return pb.Endpoint(ip=e.ip, port=e.port, zone=e.zone, for_zones=e.for_zones, port_name=e.port_name)


class LookasideServicer(pb.LookasideServicer):
    """Answers Resolve with round-robin or random picks and Watch with the eligible set on every change."""

    def __init__(self, registry: Registry, rng: random.Random | None = None,
                 allow_namespaces: frozenset[str] | None = None) -> None:
        self._registry = registry
        self._rr = RoundRobin()
        self._rng = rng or random.Random()
        #: Namespaces clients may resolve (None: any), whatever the source.
        self._allow_namespaces = allow_namespaces

    async def _target(self, service: str, namespace: str, context: grpc.aio.ServicerContext) -> Target:
        name = f"{namespace}/{service}"
        if problem := service_problem(service):
            await abort_invalid(context, "service", f"target {name!r}: service {problem}")
        if problem := namespace_problem(namespace):
            await abort_invalid(context, "namespace", f"target {name!r}: namespace {problem}")
        if self._allow_namespaces is not None and namespace not in self._allow_namespaces:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED,
                        f"target {name!r}: namespace {namespace!r} is not served by this lookaside server "
                        f"(allowed: {', '.join(sorted(self._allow_namespaces)) or 'none'}; see "
                        "--allow-namespace / LB_ALLOW_NAMESPACES)")
        return Target(namespace, service)

    @staticmethod
    async def _lookup_failed(target: Target, e: Exception, context: grpc.aio.ServicerContext) -> None:
        """Map a registry/source error to its status; return (to re-raise) if it is not a known one."""
        if isinstance(e, TargetNotFound):
            await abort(context, grpc.StatusCode.NOT_FOUND, f"target {target} not found")
        if isinstance(e, TooManyTargets):
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
            while state is not None:
                yield self._endpoint_set(target, state, request.port)
                state = await sub.next()
        log.debug("watch on %s ended", target)

    @staticmethod
    def _endpoint_set(target: Target, state: TargetState, port: str) -> pb.EndpointSet:
        endpoints: Iterable[BackendEndpoint] = ()
        if state.endpoints:
            try:
                endpoints = eligible(select_port(state.endpoints, port)[1])
            except UnknownPort:
                endpoints = ()
        return pb.EndpointSet(service=target.service, namespace=target.namespace,
                              endpoints=[_endpoint_msg(e) for e in endpoints], version=state.version)

