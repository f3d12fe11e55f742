"""The xDS control plane: Aggregated Discovery Service (state of the world, v3) on the lookaside's own server.

A stock gRPC client with an xDS bootstrap pointing here dials ``xds:///<service>.<namespace>[:<port>]`` and
balances over the same endpoints Resolve/Watch serve (see :mod:`lookaside_server._xds.resources` for the
names and resources). Per ADS stream:

* every requested name is parsed, checked against the access policy (namespace allow-list, service rules)
  and its target is watched in the registry (``Registry.watch``); a bad, forbidden or unknown name gets no
  resource (the client reports it missing; unknown targets are looked at again every ``retry_interval``
  seconds), and is logged (a forbidden one is also counted); a client whose certificate identity is not
  allowed is refused the whole stream (PERMISSION_DENIED, by the server interceptor);
* a response per type lists every subscribed name of that type that exists (state of the world), with a
  per-type ``version_info`` and a nonce per response;
* a response is sent for a new subscription and whenever the resources change (endpoint changes reach the
  ClusterLoadAssignment, and so do meaningful changes of the load weights clients report with ReportLoad:
  the locality weights follow ``LoadBoard.weights``, pushed at most once per ``_load.MIN_PUSH_INTERVAL`` per
  target, through the same ``LoadBoard.listen``/``Subscription.resend`` hook as Watch); an ACK or a NACK is
  never answered (a NACK is logged with its error detail and the same resources are not sent again);
* the node id comes only with the stream's first request and is remembered for the stream.

Once a name has been served on a stream its Listener and Cluster stay for the stream's life; if its target
disappears or its port goes away the ClusterLoadAssignment becomes empty (calls fail UNAVAILABLE) instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from lookaside_server._core.model import Endpoints, Target
from lookaside_server._core.ports import UnknownPort, eligible, select_port
from lookaside_server._core.registry import Registry, Subscription, TargetState
from lookaside_server._security.access import AccessPolicy
from lookaside_server._sources.base import TargetNotFound
from lookaside_server._xds.resources import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    ROUTE,
    TYPE_NAMES,
    TYPES,
    BadName,
    XdsName,
    XdsOptions,
    cluster,
    listener,
    load_assignment,
    parse_name,
    route_configuration,
)

if TYPE_CHECKING:
    from lookaside_server._api.load import LoadBoard

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"
CONTROL_PLANE = "lookaside-server"


def add_xds_to_server(registry: Registry, server: grpc.aio.Server, options: XdsOptions | None = None,
                      allow_namespaces: Collection[str] | None = None,
                      access: AccessPolicy | None = None, load: LoadBoard | None = None) -> AdsServicer:
    """Serve ADS on ``server``; return the servicer (call its ``close()`` on shutdown). ``load``: the
    Lookaside servicer's load board, whose weights become the locality weights (None: ``options.weight``)."""
    servicer = AdsServicer(registry, options, allow_namespaces, access, load)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    return servicer


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """StreamAggregatedResources over the registry; DeltaAggregatedResources stays UNIMPLEMENTED."""

    def __init__(self, registry: Registry, options: XdsOptions | None = None,
                 allow_namespaces: Collection[str] | None = None, access: AccessPolicy | None = None,
                 load: LoadBoard | None = None) -> None:
        self.registry = registry
        self.options = options or XdsOptions()
        #: Client load reports aggregated per target (ReportLoad); their weights weight the localities.
        self.load = load if self.options.load_weights else None
        #: None: every namespace; else only these (as for Resolve/Watch).
        self.allow_namespaces = allow_namespaces
        #: The server's access policy (namespace allow-list and service rules, as for Resolve/Watch).
        self.access = access if access is not None else AccessPolicy(allow_namespaces)
        self._streams: set[_AdsStream] = set()
        self._ids = itertools.count(1)
        self._closed = False

    async def StreamAggregatedResources(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = _AdsStream(self, next(self._ids), context.peer())
        self._streams.add(stream)
        if self._closed:
            stream.close()
        reader = asyncio.create_task(stream.read(request_iterator), name=f"ads-{stream.id}-reader")
        try:
            async for response in stream.run():
                yield response
        finally:
            self._streams.discard(stream)
            reader.cancel()
            await stream.release()
            log.info("ADS stream %d (node %r) ended", stream.id, stream.node)

    def close(self) -> None:
        """End every stream (server shutdown) and refuse new ones; idempotent."""
        self._closed = True
        for stream in list(self._streams):
            stream.close()

    def describe(self) -> list[dict[str, object]]:
        """Open ADS streams: node id, peer and subscribed names per type (for status views)."""
        return [stream.describe() for stream in sorted(self._streams, key=lambda s: s.id)]

    def allowed(self, namespace: str) -> bool:
        """Whether ``namespace`` may be served (the same allow-list as Resolve/Watch)."""
        return self.access.allow_namespaces is None or namespace in self.access.allow_namespaces


@dataclass
class _TypeState:
    """What one stream subscribed to and was last sent, for one resource type."""

    names: frozenset[str] = frozenset()
    #: A response is owed (a new subscription) even if the resources look unchanged.
    pending: bool = False
    version: int = 0
    nonce: str = ""
    #: Serialized resources of the last response, by name (None: nothing sent yet).
    sent: dict[str, bytes] | None = None
    nacks: int = 0


@dataclass
class _Name:
    """A subscribed resource name: parsed, and whether its target is being watched."""

    name: str
    parsed: XdsName | None
    #: "ok" (target watched), "missing" (target unknown, retried), "invalid" or "denied" (never served).
    status: str
    #: Served at least once on this stream: its Listener/Cluster then stay for the stream's life.
    served: bool = False
    warned: bool = False


@dataclass
class _Watched:
    sub: Subscription
    state: TargetState
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    #: Registered with the load board: resend the current state when the target's load weights change.
    on_weights: Callable[[], None] | None = field(default=None, repr=False)


class _AdsStream:
    """One ADS stream's state machine; all of it runs on the event loop in ``run`` (plus the reader)."""

    _nonces = itertools.count(1)

    def __init__(self, servicer: AdsServicer, stream_id: int, peer: str) -> None:
        self.servicer = servicer
        self.id = stream_id
        self.peer = peer
        self.node = ""
        self._types = {t: _TypeState() for t in TYPES}
        self._requests: deque[discovery_pb2.DiscoveryRequest] = deque()
        self._names: dict[str, _Name] = {}
        self._targets: dict[Target, _Watched] = {}
        self._wake = asyncio.Event()
        self._ended = False  # the client closed its side
        self._closed = False  # the server is shutting down

    # --- inputs -------------------------------------------------------------------------------------------

    async def read(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        """Queue the client's requests for ``run`` until the client closes its side."""
        try:
            async for request in requests:
                self._requests.append(request)
                self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken stream just ends
            log.debug("ADS stream %d: reading failed: %r", self.id, e)
        finally:
            self._ended = True
            self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def _follow(self, watched: _Watched) -> None:
        while (state := await watched.sub.next()) is not None:
            watched.state = state
            self._wake.set()
        self.close()  # the registry closed: the server is shutting down

    # --- the loop -----------------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        """Handle requests and endpoint changes; yield each response to send."""
        options = self.servicer.options
        while True:
            if not (self._requests or self._ended or self._closed):
                retry = any(n.status == "missing" for n in self._names.values())
                try:
                    await asyncio.wait_for(self._wake.wait(), options.retry_interval if retry else None)
                except TimeoutError:
                    await self._retry_missing()
            self._wake.clear()
            if self._closed:
                return
            while self._requests:
                await self._handle(self._requests.popleft())
            if self._ended:
                return
            for type_url in TYPES:
                response = self._response(type_url)
                if response is not None:
                    yield response

    async def _handle(self, request: discovery_pb2.DiscoveryRequest) -> None:
        if not self.node and request.node.id:
            self.node = request.node.id
            log.info("ADS stream %d from node %r (cluster %r, %s, %s)", self.id, self.node,
                     request.node.cluster, request.node.user_agent_name or "unknown agent", self.peer)
        state = self._types.get(request.type_url)
        if state is None:
            log.warning("ADS stream %d (node %r): unsupported type %r ignored", self.id, self.node,
                        request.type_url)
            return
        kind = TYPE_NAMES[request.type_url]
        if request.HasField("error_detail"):
            state.nacks += 1
            log.error("node %r rejected %s version %r (nonce %r): %s", self.node, kind, request.version_info,
                      request.response_nonce, request.error_detail.message)
        names = frozenset(request.resource_names)
        if not request.response_nonce:
            state.pending = True  # the first request for this type on this stream
        if names != state.names:
            if names - state.names:
                state.pending = True
            log.debug("ADS stream %d (node %r): %s names %s", self.id, self.node, kind, sorted(names))
            state.names = names
            await self._track()

    async def _track(self) -> None:
        wanted = set().union(*(s.names for s in self._types.values()))
        for name in [n for n in self._names if n not in wanted]:
            del self._names[name]
        for name in sorted(wanted - set(self._names)):
            self._names[name] = await self._resolve(name)
        used = {n.parsed.target for n in self._names.values() if n.parsed is not None and n.status == "ok"}
        for target in [t for t in self._targets if t not in used]:
            self._unwatch(target)

    async def _resolve(self, name: str) -> _Name:
        try:
            parsed = parse_name(name)
        except BadName as e:
            log.warning("node %r asked for xDS name %s; sending no resource for it", self.node, e)
            return _Name(name, None, "invalid")
        if (denial := self.servicer.access.target_denial(parsed.target)) is not None:
            log.warning("node %r asked for %r: %s; sending no resource for it", self.node, name,
                        denial.message)
            return _Name(name, parsed, "denied")
        if await self._watch(parsed.target):
            return _Name(name, parsed, "ok")
        log.warning("node %r asked for %r: target %s not found; sending no resource for it (looking again "
                    "every %.3g s)", self.node, name, parsed.target, self.servicer.options.retry_interval)
        return _Name(name, parsed, "missing")

    async def _retry_missing(self) -> None:
        for n in self._names.values():
            if n.status == "missing" and n.parsed is not None and await self._watch(n.parsed.target):
                log.info("node %r: target %s of %r appeared", self.node, n.parsed.target, n.name)
                n.status = "ok"

    async def _watch(self, target: Target) -> bool:
        if target in self._targets:
            return True
        try:
            sub = await self.servicer.registry.watch(target)
        except TargetNotFound:
            return False
        except Exception as e:  # noqa: BLE001 - e.g. the source cannot read the target: retry later
            log.warning("node %r: cannot watch %s: %s", self.node, target, e)
            return False
        state = await sub.next()  # the current state is offered right away
        if state is None:  # the registry is closed
            self.servicer.registry.leave(sub)
            self.close()
            return False
        watched = _Watched(sub, state)
        watched.task = asyncio.create_task(self._follow(watched), name=f"ads-{self.id}-{target}")
        load = self.servicer.load
        if load is not None:
            # As Watch does: the same state again, so the EDS answer is rebuilt with the new weights (and
            # sent only if it differs from the last one). LoadBoard rate-limits these per target.
            def weights_changed() -> None:
                watched.sub.resend(watched.state)

            watched.on_weights = weights_changed
            load.listen(target, weights_changed)
        self._targets[target] = watched
        return True

    def _unwatch(self, target: Target) -> None:
        watched = self._targets.pop(target)
        if watched.on_weights is not None and self.servicer.load is not None:
            self.servicer.load.unlisten(target, watched.on_weights)
        if watched.task is not None:
            watched.task.cancel()
        self.servicer.registry.leave(watched.sub)

    async def release(self) -> None:
        """Stop following every target (the stream ended)."""
        tasks = [w.task for w in self._targets.values() if w.task is not None]
        for target in list(self._targets):
            self._unwatch(target)
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- responses ----------------------------------------------------------------------------------------

    def _endpoints(self, n: _Name) -> Endpoints | None:
        """The eligible endpoints of the name's port, or None if the name does not (yet) exist."""
        assert n.parsed is not None
        state = self._targets[n.parsed.target].state
        try:
            if state.endpoints is None:
                raise TargetNotFound(n.parsed.target)
            chosen = select_port(state.endpoints, n.parsed.port)[1]
        except (TargetNotFound, UnknownPort) as e:
            if not n.served:
                if not n.warned:
                    log.warning("node %r asked for %r: %s; sending no resource for it", self.node, n.name, e)
                    n.warned = True
                return None
            return ()
        n.served = True
        return eligible(chosen)

    def _build(self, type_url: str, n: _Name) -> bytes | None:
        if n.status != "ok":
            return None
        endpoints = self._endpoints(n)
        if endpoints is None:
            return None
        options = self.servicer.options
        if type_url == LISTENER:
            msg = listener(n.name, options)
        elif type_url == ROUTE:
            msg = route_configuration(n.name)
        elif type_url == CLUSTER:
            msg = cluster(n.name, options)
        else:
            assert type_url == ENDPOINTS
            load = self.servicer.load
            weights = load.weights(n.parsed.target) if load is not None and n.parsed is not None else None
            msg = load_assignment(n.name, endpoints, options, weights)
        return msg.SerializeToString(deterministic=True)

    def _response(self, type_url: str) -> discovery_pb2.DiscoveryResponse | None:
        state = self._types[type_url]
        if not state.names and not state.pending:
            return None
        resources: dict[str, bytes] = {}
        for name in sorted(state.names):
            n = self._names.get(name)
            blob = None if n is None else self._build(type_url, n)
            if blob is not None:
                resources[name] = blob
        if not state.pending and resources == state.sent:
            return None
        state.pending = False
        state.sent = resources
        state.version += 1
        state.nonce = f"{self.id}.{next(self._nonces)}"
        log.debug("ADS stream %d (node %r): %s version %d nonce %s: %s", self.id, self.node,
                  TYPE_NAMES[type_url], state.version, state.nonce, sorted(resources))
        return discovery_pb2.DiscoveryResponse(
            version_info=str(state.version),
            resources=[any_pb2.Any(type_url=type_url, value=blob) for blob in resources.values()],
            type_url=type_url,
            nonce=state.nonce,
            control_plane=base_pb2.ControlPlane(identifier=CONTROL_PLANE),
        )

    def describe(self) -> dict[str, object]:
        return {
            "stream": self.id,
            "node": self.node,
            "peer": self.peer,
            "subscriptions": {TYPE_NAMES[t]: sorted(s.names) for t, s in self._types.items() if s.names},
            "versions": {TYPE_NAMES[t]: s.version for t, s in self._types.items() if s.version},
            "nacks": sum(s.nacks for s in self._types.values()),
        }
