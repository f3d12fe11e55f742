"""The xDS control plane: Aggregated Discovery Service (state of the world, v3) on the lookaside's own server.

A stock gRPC client with an xDS bootstrap pointing here dials ``xds:///<service>.<namespace>[:<port>]`` and
balances over the same endpoints Resolve/Watch serve (see :mod:`lookaside_server._xds.resources` for the
names and resources). Per ADS stream:

* every requested name is parsed with the one target grammar (``Target.parse``), checked against the access
  policy (namespace allow-list, service rules) and its Service is watched in the registry
  (``Registry.watch``); a bad, forbidden or unknown name gets no resource (the client reports it missing;
  unknown targets are looked at again every ``retry_interval`` seconds), and is logged (a forbidden one is
  also counted); a client whose certificate identity is not allowed is refused the whole stream
  (PERMISSION_DENIED, by the server interceptor);
* a Listener is served under every spelling a client subscribes to (the name it dialled); RouteConfiguration,
  Cluster and ClusterLoadAssignment only under the canonical name the Listener points to. Those are built once
  per (target, port, endpoint version, load weights) in the servicer's :class:`ResourceCache` and the same
  bytes go to every stream, however many spellings or streams ask;
* a stream may subscribe to at most ``max_names`` names (all types together): a request beyond that ends the
  stream RESOURCE_EXHAUSTED naming ``--xds-max-names`` (counted as the limit ``xds_max_names``);
* at most ``max_queued_requests`` received requests wait to be handled; while they do the stream is not read,
  so a client that sends without reading the answers is held back by HTTP/2 flow control;
* a request that is not a DiscoveryRequest ends the stream INVALID_ARGUMENT;
* a response per type lists every subscribed name of that type that exists (state of the world), with a
  per-type ``version_info`` and a nonce per response;
* a response is sent for a new subscription and whenever the resources change (endpoint changes reach the
  ClusterLoadAssignment, and so do meaningful changes of the load weights clients report with ReportLoad:
  the locality weights follow ``LoadBoard.weights``, pushed at most once per ``_load.MIN_PUSH_INTERVAL`` per
  target, through the same ``LoadBoard.listen``/``Subscription.resend`` hook as Watch); an ACK or a NACK is
  never answered (a NACK is logged with its error detail and the same resources are not sent again);
* NACKs, unknown type URLs and unknown, invalid, missing or forbidden names are counted
  (``lookaside_xds_rejects_total{reason}``) and logged at most once per ``log_interval`` per client IP and
  reason;
* the node id comes only with the stream's first request and is remembered for the stream, and so is the
  client's zone (``node.locality.zone``): a client in a zone gets a zone-aware ClusterLoadAssignment
  (``resources.placements``: its zone at priority 0, spill-over weighted in when its zone is short of
  endpoints, the other zones at priority 1), built once per (target, version, weights, zone); at most
  ``max_zones`` distinct zones at once (streams of further zones get the zone-unaware encoding; logged and
  counted as the limit ``xds_max_zones``);
* a client that goes away (cancel, broken connection), also in the middle of a write, ends the stream quietly
  (DEBUG).

Once a name has been served on a stream its Listener and Cluster stay for the stream's life; if its target
disappears or its port goes away the ClusterLoadAssignment becomes empty (calls fail UNAVAILABLE) instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.protobuf import message as pb_message

from lookaside_grpc.protocol import InvalidTarget
from lookaside_server._core.errors import abort
from lookaside_server._core.model import Endpoints, Target
from lookaside_server._core.ports import UnknownPort, eligible, select_port
from lookaside_server._core.registry import Registry, Subscription, TargetState
from lookaside_server._security.access import AccessPolicy
from lookaside_server._security.limits import peer_ip, record_hit
from lookaside_server._sources.base import TargetNotFound
from lookaside_server._xds.resources import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    ROUTE,
    TYPE_NAMES,
    TYPES,
    XdsOptions,
    cluster,
    listener,
    load_assignment,
    route_configuration,
)

if TYPE_CHECKING:
    from lookaside_server._api.load import LoadBoard

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"
CONTROL_PLANE = "lookaside-server"
#: The limit name of ``max_names`` (``lookaside_limit_hits_total{limit}``) and its flag.
MAX_NAMES_LIMIT = "xds_max_names"
MAX_NAMES_FLAG = "--xds-max-names"
#: The limit name of ``max_zones`` and its flag.
MAX_ZONES_LIMIT = "xds_max_zones"
MAX_ZONES_FLAG = "--xds-max-zones"
#: Longest zone name taken from a client's bootstrap (Kubernetes label values have at most 63 characters).
MAX_ZONE_LENGTH = 128

#: Why a request (or part of one) was not served: the ``reason`` of ``lookaside_xds_rejects_total``.
NACK = "nack"
UNKNOWN_TYPE = "unknown_type"
UNKNOWN_NAME = "unknown_name"  # a RouteConfiguration/Cluster/ClusterLoadAssignment by a non-canonical name
INVALID_NAME = "invalid_name"
NOT_FOUND = "not_found"
DENIED = "denied"
TOO_MANY_NAMES = "too_many_names"
INVALID_REQUEST = "invalid_request"
REJECT_REASONS = (
    NACK,
    UNKNOWN_TYPE,
    UNKNOWN_NAME,
    INVALID_NAME,
    NOT_FOUND,
    DENIED,
    TOO_MANY_NAMES,
    INVALID_REQUEST,
)

#: Seconds a stream whose write failed (the client went away) waits for grpc to cancel it.
_CANCEL_WAIT = 5.0
#: Longest text quoted from a client (names, type URLs, NACK details) in a log line.
_QUOTE = 200


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


def add_xds_to_server(
    registry: Registry,
    server: grpc.aio.Server,
    options: XdsOptions | None = None,
    allow_namespaces: Collection[str] | None = None,
    access: AccessPolicy | None = None,
    load: LoadBoard | None = None,
    on_reject: Callable[[str], None] | None = None,
) -> AdsServicer:
    """Serve ADS on ``server``; return the servicer (call its ``close()`` on shutdown). ``load``: the
    Lookaside servicer's load board, whose weights become the locality weights (None: ``options.weight``).
    ``on_reject(reason)``: counts each rejected request part (one of :data:`REJECT_REASONS`)."""
    servicer = AdsServicer(registry, options, allow_namespaces, access, load, on_reject)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    return servicer


class RateLimitedLog:
    """At most ``burst`` log lines per (client IP, reason) per ``interval`` seconds; the lines held back are
    summed up in the next one logged. Remembers at most ``max_keys`` (client, reason) pairs."""

    def __init__(
        self,
        interval: float,
        burst: int = 5,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        #: (client, reason) -> [end of the current window, lines logged in it, lines held back since the last]
        self._keys: dict[tuple[str, str], list[float]] = {}

    def __call__(self, level: int, client: str, reason: str, msg: str, *args: object) -> None:
        now = self._clock()
        key = (client, reason)
        entry = self._keys.get(key)
        if entry is None or now >= entry[0]:
            if entry is None and len(self._keys) >= self.max_keys:
                self._prune(now)
            held = entry[2] if entry is not None else 0
            entry = self._keys[key] = [now + self.interval, 0, held]
        if entry[1] >= self.burst:
            entry[2] += 1
            return
        entry[1] += 1
        if entry[2]:
            msg += " (%d more like it from this client not logged)"
            args = (*args, int(entry[2]))
            entry[2] = 0
        log.log(level, msg, *args)

    def _prune(self, now: float) -> None:
        for key in [k for k, (until, _, _) in self._keys.items() if until <= now]:
            del self._keys[key]
        if len(self._keys) >= self.max_keys:  # all recent: forget the oldest half
            for key in list(self._keys)[: len(self._keys) // 2]:
                del self._keys[key]


@dataclass(eq=False)
class _Shared:
    """The resources of one canonical (target, port), encoded once per endpoint version and shared."""

    target: Target
    name: str
    users: int = 0
    #: The state ``endpoints`` was computed for, and the result: the eligible endpoints of the port, or None
    #: (the target is gone or has no such port; ``problem`` says which).
    state: TargetState | None = None
    endpoints: Endpoints | None = None
    problem: str = ""
    #: The ClusterLoadAssignment by client zone ("" = zone-unaware): (blob, the state and the load weights it
    #: was built for; weights compared by identity).
    eds: dict[str, tuple[bytes, TargetState, object]] = field(default_factory=dict)
    cluster: bytes | None = None
    route: bytes | None = None


def _older(state: TargetState, than: TargetState | None) -> bool:
    """Whether ``state`` is an older state of the target than ``than`` (a stream not yet woken for the new
    one): keep the newer one cached. States are compared as objects (a target the registry forgot and
    subscribed again starts over at version 1)."""
    return than is not None and state.version < than.version and state.changed_at <= than.changed_at


class ResourceCache:
    """Canonical resources shared by every stream, one entry per (target, port) in use (reference counted),
    each built once per (endpoint version, load weights)."""

    def __init__(self, options: XdsOptions, load: LoadBoard | None) -> None:
        self.options = options
        self.load = load
        self._entries: dict[Target, _Shared] = {}
        #: Resources built, by type (for tests and status views).
        self.builds: Counter[str] = Counter()
        #: Client zones of the open streams (admitted ones), with how many streams are in each.
        self.zones: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, target: Target) -> _Shared:
        entry = self._entries.get(target)
        if entry is None:
            entry = self._entries[target] = _Shared(target, str(target))
        entry.users += 1
        return entry

    def release(self, entry: _Shared) -> None:
        entry.users -= 1
        if entry.users <= 0 and self._entries.get(entry.target) is entry:
            del self._entries[entry.target]

    def endpoints(self, entry: _Shared, state: TargetState) -> Endpoints | None:
        """The eligible endpoints of the entry's port in ``state``; None (and ``entry.problem``) if the target
        is gone or has no such port."""
        if entry.state is state:
            return entry.endpoints
        try:
            if state.endpoints is None:
                raise TargetNotFound(entry.target)
            result: Endpoints | None = eligible(select_port(state.endpoints, entry.target.port)[1])
            problem = ""
        except (TargetNotFound, UnknownPort) as e:
            result, problem = None, str(e) or f"target {entry.target} not found"
        if not _older(state, entry.state):
            entry.state, entry.endpoints, entry.problem = state, result, problem
        return result

    def load_assignment(self, entry: _Shared, state: TargetState, zone: str = "") -> bytes:
        """The ClusterLoadAssignment of ``state`` for a client in ``zone`` ("" = zone-unaware), cached per
        zone; zones no stream uses any more (see :meth:`AdsServicer.admit_zone`) are dropped."""
        weights = self.load.weights(entry.target.with_port("")) if self.load is not None else None
        cached = entry.eds.get(zone)
        if (
            cached is not None
            and cached[1] is state
            and (cached[2] is weights or (not cached[2] and not weights))
        ):
            return cached[0]
        endpoints = self.endpoints(entry, state) or ()
        blob = load_assignment(
            entry.name, endpoints, self.options, weights, zone, self.options.grouped(entry.target)
        ).SerializeToString(deterministic=True)
        self.builds[ENDPOINTS] += 1
        if cached is None or not _older(state, cached[1]):
            for stale in [z for z in entry.eds if z and z not in self.zones]:
                del entry.eds[stale]
            entry.eds[zone] = (blob, state, weights)
        return blob

    def cluster(self, entry: _Shared) -> bytes:
        if entry.cluster is None:
            header = self.options.hash_header(entry.target)
            entry.cluster = cluster(entry.name, self.options, header).SerializeToString(deterministic=True)
            self.builds[CLUSTER] += 1
        return entry.cluster

    def route(self, entry: _Shared) -> bytes:
        if entry.route is None:
            header = self.options.hash_header(entry.target)
            entry.route = route_configuration(entry.name, header).SerializeToString(deterministic=True)
            self.builds[ROUTE] += 1
        return entry.route


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """StreamAggregatedResources over the registry; DeltaAggregatedResources stays UNIMPLEMENTED."""

    def __init__(
        self,
        registry: Registry,
        options: XdsOptions | None = None,
        allow_namespaces: Collection[str] | None = None,
        access: AccessPolicy | None = None,
        load: LoadBoard | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.options = options or XdsOptions()
        #: Client load reports aggregated per target (ReportLoad); their weights weight the localities.
        self.load = load if self.options.load_weights else None
        #: None: every namespace; else only these (as for Resolve/Watch).
        self.allow_namespaces = allow_namespaces
        #: The server's access policy (namespace allow-list and service rules, as for Resolve/Watch).
        self.access = access if access is not None else AccessPolicy(allow_namespaces)
        #: The canonical resources, shared by every stream.
        self.cache = ResourceCache(self.options, self.load)
        self.sending = SendingBudget(self.options.max_sending_bytes)
        #: Rejected request parts by reason (see :data:`REJECT_REASONS`), also passed to ``on_reject``.
        self.rejects: Counter[str] = Counter()
        #: Streams whose zone was not admitted (``max_zones`` distinct zones in use, or a bad zone name).
        self.zone_refusals = 0
        self._on_reject = on_reject
        self.log_limited = RateLimitedLog(self.options.log_interval)
        self._streams: set[_AdsStream] = set()
        self._ids = itertools.count(1)
        self._closed = False

    def reject(self, stream: _AdsStream, reason: str, level: int, msg: str, *args: object) -> None:
        """Count a rejected request part and log it, rate-limited per client IP and reason."""
        self.rejects[reason] += 1
        if self._on_reject is not None:
            try:
                self._on_reject(reason)
            except Exception:  # noqa: BLE001 - counting must not break the stream
                log.exception("counting an xDS reject failed")
        self.log_limited(level, stream.client, reason, msg, *args)

    async def StreamAggregatedResources(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        # A coroutine with context.write (not an async generator): a write that fails because the client went
        # away is ours to catch, instead of grpc logging it as an ERROR with a traceback.
        stream = _AdsStream(self, next(self._ids), context.peer())
        self._streams.add(stream)
        if self._closed:
            stream.close()
        reader = asyncio.create_task(stream.read(request_iterator), name=f"ads-{stream.id}-reader")
        try:
            async with contextlib.aclosing(stream.run()) as responses:
                async for pending in responses:
                    try:
                        async with self.sending.hold(pending.size):
                            await context.write(pending.message())
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # noqa: BLE001 - the call is over (client cancel, broken connection)
                        log.debug(
                            "ADS stream %d (node %r): write failed, the client went away: %r",
                            stream.id,
                            stream.node,
                            e,
                        )
                        # grpc cancels this task as soon as core reports the call's end (logged at DEBUG);
                        # returning first would make grpc log its failing status write as an ERROR.
                        await asyncio.sleep(_CANCEL_WAIT)
                        return
            if stream.failure is not None:
                code, message = stream.failure
                await abort(context, code, message)
        finally:
            self._streams.discard(stream)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await stream.release()
            self.release_zone(stream.zone)
            log.info("ADS stream %d (node %r) ended", stream.id, stream.node)

    def admit_zone(self, stream: _AdsStream, zone: str) -> str:
        """The zone ``stream`` is served for: ``zone`` if zones are on, it is sane and it is in use or fewer
        than ``max_zones`` zones are; else "" (zone-unaware; logged and counted)."""
        zones = self.cache.zones
        limit = self.options.max_zones
        if not zone or not limit:
            return ""
        if len(zone) > MAX_ZONE_LENGTH or not zone.isprintable():
            self.zone_refusals += 1
            self.log_limited(
                logging.WARNING,
                stream.client,
                "zone",
                "ADS stream %d (node %r, %s): zone %s is not a zone name; serving it zone-unaware endpoints",
                stream.id,
                stream.node,
                stream.peer,
                _quote(zone),
            )
            return ""
        if zone not in zones and len(zones) >= limit:
            self.zone_refusals += 1
            record_hit(MAX_ZONES_LIMIT)
            self.log_limited(
                logging.WARNING,
                stream.client,
                MAX_ZONES_LIMIT,
                "limit %s reached: ADS stream %d (node %r, %s) is in zone %s, but %d zones are in use "
                "(%s); serving it zone-unaware endpoints",
                MAX_ZONES_LIMIT,
                stream.id,
                stream.node,
                stream.peer,
                _quote(zone),
                limit,
                MAX_ZONES_FLAG,
            )
            return ""
        zones[zone] += 1
        return zone

    def release_zone(self, zone: str) -> None:
        """A stream admitted in ``zone`` ended."""
        zones = self.cache.zones
        if zone and zones.get(zone, 0) > 0:
            zones[zone] -= 1
            if zones[zone] <= 0:
                del zones[zone]

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


@dataclass(frozen=True, slots=True)
class _Pending:
    """A response owed to a stream: the shared resource bytes, not yet copied into a message."""

    type_url: str
    version: str
    nonce: str
    resources: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return sum(len(r) for r in self.resources) + 256

    def message(self) -> discovery_pb2.DiscoveryResponse:
        return discovery_pb2.DiscoveryResponse(
            version_info=self.version,
            resources=[any_pb2.Any(type_url=self.type_url, value=blob) for blob in self.resources],
            type_url=self.type_url,
            nonce=self.nonce,
            control_plane=base_pb2.ControlPlane(identifier=CONTROL_PLANE),
        )


class SendingBudget:
    """Bounds the bytes of responses being built and written at once, over all streams: each stream builds
    its message (a copy of the shared resources) only once its bytes fit, first come first served; a
    response bigger than the whole budget waits until nothing else is being sent."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        #: Responses that had to wait for room (a fan-out bigger than the budget).
        self.waited = 0

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        size = min(size, self.limit)
        if self._waiting or self.used + size > self.limit:
            self.waited += 1
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (size, fut)
            self._waiting.append(entry)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release(size)  # granted just as we were cancelled: pass it on
                else:
                    self._waiting.remove(entry)
                    self._grant()
                raise
        else:
            self.used += size
        try:
            yield
        finally:
            self._release(size)

    def _release(self, size: int) -> None:
        self.used -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.used + self._waiting[0][0] <= self.limit:
            size, fut = self._waiting.popleft()
            if fut.done():
                continue
            self.used += size
            fut.set_result(None)


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


@dataclass(eq=False)
class _Name:
    """A subscribed resource name: its target (canonical, with the port) and whether it is being watched."""

    name: str
    target: Target | None
    #: "ok" (target watched), "missing" (target unknown, retried), "invalid" or "denied" (never served).
    status: str
    #: The shared canonical resources (for "ok" and "missing").
    shared: _Shared | None = None
    #: Served at least once on this stream: its Listener/Cluster then stay for the stream's life.
    served: bool = False
    warned: bool = False
    #: This name's Listener, encoded (it carries the name, so it is the stream's own).
    listener: bytes | None = None

    @property
    def canonical(self) -> bool:
        return self.target is not None and self.name == str(self.target)

    @property
    def service(self) -> Target | None:
        """The Service watched in the registry (the target without its port)."""
        return None if self.target is None else self.target.with_port("")


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
        #: The client IP (the key of rate-limited logs).
        self.client = peer_ip(peer)
        self.node = ""
        #: The client's zone (bootstrap ``node.locality.zone``) as admitted: "" = zone-unaware endpoints.
        self.zone = ""
        self._types = {t: _TypeState() for t in TYPES}
        self._requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue(
            maxsize=servicer.options.max_queued_requests
        )
        self._names: dict[str, _Name] = {}
        self._targets: dict[Target, _Watched] = {}
        self._wake = asyncio.Event()
        self._ended = False  # the client closed its side
        self._closed = False  # the server is shutting down
        #: How the stream must end (status code, message) instead of OK.
        self.failure: tuple[grpc.StatusCode, str] | None = None

    # --- inputs -------------------------------------------------------------------------------------------

    async def read(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        """Queue the client's requests for ``run`` until the client closes its side; while the queue is full
        nothing more is read (HTTP/2 flow control then holds the client back)."""
        try:
            async for request in requests:
                await self._requests.put(request)
                self._wake.set()
        except asyncio.CancelledError:
            raise
        except pb_message.DecodeError as e:
            self.servicer.reject(
                self,
                INVALID_REQUEST,
                logging.WARNING,
                "ADS stream %d (node %r, %s): request is not a DiscoveryRequest (%s); ending "
                "the stream INVALID_ARGUMENT",
                self.id,
                self.node,
                self.peer,
                e,
            )
            self._fail(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid envoy.service.discovery.v3.DiscoveryRequest: {e}",
            )
        except Exception as e:  # noqa: BLE001 - a broken stream just ends
            log.debug("ADS stream %d: reading failed: %r", self.id, e)
        finally:
            self._ended = True
            self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _fail(self, code: grpc.StatusCode, message: str) -> None:
        if self.failure is None:
            self.failure = (code, message)
        self._wake.set()

    async def _follow(self, watched: _Watched) -> None:
        while (state := await watched.sub.next()) is not None:
            watched.state = state
            self._wake.set()
        self.close()  # the registry closed: the server is shutting down

    # --- the loop -----------------------------------------------------------------------------------------

    async def run(self) -> AsyncGenerator[_Pending, None]:
        """Handle requests and endpoint changes; yield each response to send (not built yet: see
        :class:`SendingBudget`)."""
        options = self.servicer.options
        while True:
            if self._requests.empty() and not (self._ended or self._closed or self.failure):
                retry = any(n.status == "missing" for n in self._names.values())
                try:
                    await asyncio.wait_for(self._wake.wait(), options.retry_interval if retry else None)
                except TimeoutError:
                    await self._retry_missing()
            self._wake.clear()
            if self._closed:
                return
            while not self._requests.empty() and self.failure is None:
                await self._handle(self._requests.get_nowait())
            if self.failure is not None or (self._ended and self._requests.empty()):
                return
            for type_url in TYPES:
                response = self._response(type_url)
                if response is not None:
                    yield response

    async def _handle(self, request: discovery_pb2.DiscoveryRequest) -> None:
        if not self.node and request.node.id:
            self.node = request.node.id[:_QUOTE]
            self.zone = self.servicer.admit_zone(self, request.node.locality.zone)
            log.info(
                "ADS stream %d from node %r (cluster %r, %s, %s%s)",
                self.id,
                self.node,
                request.node.cluster[:_QUOTE],
                request.node.user_agent_name[:_QUOTE] or "unknown agent",
                self.peer,
                f", zone {self.zone!r}" if self.zone else "",
            )
        state = self._types.get(request.type_url)
        if state is None:
            self.servicer.reject(
                self,
                UNKNOWN_TYPE,
                logging.WARNING,
                "ADS stream %d (node %r, %s): unsupported type %s ignored",
                self.id,
                self.node,
                self.peer,
                _quote(request.type_url),
            )
            return
        kind = TYPE_NAMES[request.type_url]
        if request.HasField("error_detail"):
            state.nacks += 1
            self.servicer.reject(
                self,
                NACK,
                logging.WARNING,
                "node %r (%s) rejected %s version %s (nonce %s): %s",
                self.node,
                self.peer,
                kind,
                _quote(request.version_info),
                _quote(request.response_nonce),
                _quote(request.error_detail.message),
            )
        names = frozenset(request.resource_names)
        if len(names) > self.servicer.options.max_names:
            self._too_many(len(names), f"one {kind} request names {len(names)} resources")
            return
        if not request.response_nonce:
            state.pending = True  # the first request for this type on this stream
        if names != state.names:
            added = names - state.names
            if added:
                state.pending = True
            log.debug("ADS stream %d (node %r): %s names %s", self.id, self.node, kind, sorted(names))
            state.names = names
            await self._track()
            if request.type_url != LISTENER:
                for name in sorted(added):
                    n = self._names.get(name)
                    if n is not None and n.target is not None and not n.canonical:
                        self.servicer.reject(
                            self,
                            UNKNOWN_NAME,
                            logging.WARNING,
                            "node %r (%s) asked for %s %s: not a name this server gives out (it names %ss "
                            "canonically: %r); sending no resource for it",
                            self.node,
                            self.peer,
                            kind,
                            _quote(name),
                            kind,
                            str(n.target),
                        )

    def _too_many(self, count: int, what: str) -> None:
        limit = self.servicer.options.max_names
        record_hit(MAX_NAMES_LIMIT)
        self.servicer.reject(
            self,
            TOO_MANY_NAMES,
            logging.WARNING,
            "limit %s reached: ADS stream %d (node %r, %s): %s, more than %d",
            MAX_NAMES_LIMIT,
            self.id,
            self.node,
            self.peer,
            what,
            limit,
        )
        self._fail(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many xDS resource names: {what}; at most {limit} names per ADS stream ({MAX_NAMES_FLAG})",
        )

    async def _track(self) -> None:
        wanted: set[str] = set().union(*(s.names for s in self._types.values()))
        if len(wanted) > self.servicer.options.max_names:
            self._too_many(len(wanted), f"the stream subscribes to {len(wanted)} resources")
            return
        for name in [n for n in self._names if n not in wanted]:
            self._forget(self._names.pop(name))
        for name in sorted(wanted - set(self._names)):
            self._names[name] = await self._resolve(name)
        used = {n.service for n in self._names.values() if n.status == "ok"}
        for target in [t for t in self._targets if t not in used]:
            self._unwatch(target)

    def _forget(self, n: _Name) -> None:
        if n.shared is not None:
            self.servicer.cache.release(n.shared)
            n.shared = None

    async def _resolve(self, name: str) -> _Name:
        try:
            target = Target.parse(name)
        except InvalidTarget as e:
            self.servicer.reject(
                self,
                INVALID_NAME,
                logging.WARNING,
                "node %r (%s) asked for xDS name %s: %s; sending no resource for it",
                self.node,
                self.peer,
                _quote(name),
                e,
            )
            return _Name(name, None, "invalid")
        service = target.with_port("")
        if (denial := self.servicer.access.target_denial(service)) is not None:
            self.servicer.reject(
                self,
                DENIED,
                logging.WARNING,
                "node %r (%s) asked for %s: %s; sending no resource for it",
                self.node,
                self.peer,
                _quote(name),
                denial.message,
            )
            return _Name(name, target, "denied")
        shared = self.servicer.cache.acquire(target)
        if await self._watch(service):
            return _Name(name, target, "ok", shared)
        self.servicer.reject(
            self,
            NOT_FOUND,
            logging.WARNING,
            "node %r (%s) asked for %s: target %s not found; sending no resource for it "
            "(looking again every %.3g s)",
            self.node,
            self.peer,
            _quote(name),
            service,
            self.servicer.options.retry_interval,
        )
        return _Name(name, target, "missing", shared)

    async def _retry_missing(self) -> None:
        tried: dict[Target, bool] = {}
        for n in list(self._names.values()):
            if n.status != "missing" or (service := n.service) is None:
                continue
            if service not in tried:
                tried[service] = await self._watch(service)
                if tried[service]:
                    log.info("node %r: target %s appeared", self.node, service)
            if tried[service]:
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
        """Stop following every target and give back the shared resources (the stream ended)."""
        tasks = [w.task for w in self._targets.values() if w.task is not None]
        for target in list(self._targets):
            self._unwatch(target)
        for n in self._names.values():
            self._forget(n)
        self._names.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- responses ----------------------------------------------------------------------------------------

    def _state(self, n: _Name) -> TargetState | None:
        service = n.service
        watched = self._targets.get(service) if service is not None else None
        return None if watched is None else watched.state

    def _exists(self, n: _Name, state: TargetState) -> bool:
        """Whether the name's resources are served: its port exists, or it was served before on this stream
        (then its ClusterLoadAssignment is empty rather than its Listener gone)."""
        assert n.shared is not None
        if self.servicer.cache.endpoints(n.shared, state) is not None:
            n.served = True
            return True
        if not n.served and not n.warned:
            n.warned = True
            self.servicer.reject(
                self,
                NOT_FOUND,
                logging.WARNING,
                "node %r (%s) asked for %s: %s; sending no resource for it",
                self.node,
                self.peer,
                _quote(n.name),
                n.shared.problem,
            )
        return n.served

    def _build(self, type_url: str, n: _Name) -> bytes | None:
        if n.status != "ok" or n.shared is None:
            return None
        state = self._state(n)
        if state is None or not self._exists(n, state):
            return None
        cache = self.servicer.cache
        if type_url == LISTENER:
            if n.listener is None:
                header = cache.options.hash_header(n.shared.target)
                n.listener = listener(n.name, cache.options, n.shared.name, header).SerializeToString(
                    deterministic=True
                )
            return n.listener
        if not n.canonical:  # the server names these canonically: a client never needs another spelling
            return None
        if type_url == ROUTE:
            return cache.route(n.shared)
        if type_url == CLUSTER:
            return cache.cluster(n.shared)
        assert type_url == ENDPOINTS
        return cache.load_assignment(n.shared, state, self.zone)

    def _response(self, type_url: str) -> _Pending | None:
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
        log.debug(
            "ADS stream %d (node %r): %s version %d nonce %s: %s",
            self.id,
            self.node,
            TYPE_NAMES[type_url],
            state.version,
            state.nonce,
            sorted(resources),
        )
        return _Pending(type_url, str(state.version), state.nonce, tuple(resources.values()))

    def describe(self) -> dict[str, object]:
        return {
            "stream": self.id,
            "node": self.node,
            "zone": self.zone,
            "peer": self.peer,
            "subscriptions": {TYPE_NAMES[t]: sorted(s.names) for t, s in self._types.items() if s.names},
            "versions": {TYPE_NAMES[t]: s.version for t, s in self._types.items() if s.version},
            "nacks": sum(s.nacks for s in self._types.values()),
        }
