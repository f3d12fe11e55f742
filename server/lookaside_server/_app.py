"""Assembles the lookaside gRPC server: Lookaside servicer, health, reflection, endpoint source, shutdown."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lookaside_grpc import protocol as pb
from lookaside_server._api.load import LoadBoard, LoadLimits
from lookaside_server._api.servicer import LookasideServicer, add_to_server
from lookaside_server._config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig  # noqa: F401 - re-exported
from lookaside_server._core.registry import Registry, TargetStatus
from lookaside_server._security.access import AccessPolicy
from lookaside_server._security.guard import ServerGuard
from lookaside_server._security.limits import StreamSlots
from lookaside_server._security.tls import CertificateStore, server_credentials
from lookaside_server._web.http import HttpServer
from lookaside_server._web.metrics import ServerMetrics
from lookaside_server._web.status_page import add_routes

log = logging.getLogger(__name__)

#: Name prefixes grpc.aio gives the tasks of the RPCs it serves (the call's and its handler's).
_GRPC_RPC_TASKS = ("rpc_task", "HandleExceptions[")
#: Longest wait at shutdown for RPC handlers that grpc has already ended in core to run to their end.
_HANDLER_DRAIN_SECONDS = 2.0


def _host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class LookasideServer:
    """The lookaside server on grpc.aio: start() binds and serves, stop() shuts down cleanly."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.source = config.make_source()
        self.registry = Registry(self.source)
        self.health = health.aio.HealthServicer()
        #: Counters and gauges of this server (``/metrics``), in a registry of its own.
        self.slots = StreamSlots(config.limits.max_watches, config.limits.max_watches_per_peer)
        self.metrics = ServerMetrics(self.slots)
        #: The one access policy every RPC goes through.
        access = config.security.access
        self.access = AccessPolicy(
            access.namespaces, access.services, access.client_identities, on_deny=self.metrics.deny
        )
        #: The TLS material in use (None: plaintext; valid after start).
        self.tls: CertificateStore | None = None
        self._server: grpc.aio.Server | None = None
        self._source_started = False
        self._http: HttpServer | None = None
        #: The xDS servicer (AdsServicer) when xDS is on (valid after start).
        self.xds: object | None = None
        self.port = 0
        #: Port of the HTTP status listener (valid after start, 0 if it is off).
        self.http_port = 0

    @property
    def address(self) -> str:
        """``host:port`` actually bound (valid after start)."""
        return _host_port(self.config.listen.host, self.port)

    async def start(self) -> int:
        """Start the source, bind and start serving; return the bound port."""
        await self.source.start(self.registry.publish)
        self._source_started = True
        try:
            limits = self.config.limits
            server = grpc.aio.server(
                interceptors=[ServerGuard(self.access, self.slots, self.metrics)],
                options=limits.server_options(),
                maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
            )
            servicer = LookasideServicer(
                self.registry,
                allow_namespaces=self.config.security.access.namespaces,
                access=self.access,
                load_limits=LoadLimits(
                    limits.max_load_reports_per_peer,
                    limits.max_load_reports_per_target,
                    limits.max_load_report_endpoints,
                    limits.max_load_report_rate_per_peer,
                ),
            )
            add_to_server(servicer, server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            xds_services = self._add_xds(server, servicer.load)
            # the client keeps lookaside.proto in a private pool; reflection reads the default one
            if not pb.add_to_default_pool():
                log.warning(
                    "reflection cannot describe %s: another lookaside.proto is loaded", pb.SERVICE_NAME
                )
            reflection.enable_server_reflection(
                (
                    pb.SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                    *xds_services,
                ),
                server,
            )
            address = _host_port(self.config.listen.host, self.config.listen.port)
            if self.config.security.tls is not None:
                credentials, self.tls = server_credentials(self.config.security.tls)
                bound = server.add_secure_port(address, credentials)
            else:
                bound = server.add_insecure_port(address)
            self.metrics.attach(self.registry, self.tls)
            if bound == 0:
                raise OSError(f"cannot bind {_host_port(self.config.listen.host, self.config.listen.port)}")
            if self.config.http.port is not None:
                await self._start_http()
            await server.start()
        except BaseException:
            if self._http is not None:
                await self._http.stop()
                self._http = None
            await self.source.stop()
            self._source_started = False
            raise
        self._server = server
        self.port = bound
        for service in ("", pb.SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        tls = self.config.security.tls
        log.info(
            "listening on %s (%s)",
            self.address,
            "plaintext" if tls is None else "mutual TLS" if tls.mutual else "TLS",
        )
        return bound

    def _add_xds(self, server: grpc.aio.Server, load: LoadBoard | None = None) -> tuple[str, ...]:
        """Serve ADS on ``server`` if enabled (locality weights from ``load``, the client load reports);
        return the service names to list in reflection."""
        if not self.config.xds.enabled:
            return ()
        try:
            from lookaside_server._xds.stream import SERVICE_NAME, add_xds_to_server
        except ImportError as e:
            log.warning("xDS is off: %s (install the xds-protos package)", e)
            return ()
        self.xds = add_xds_to_server(
            self.registry,
            server,
            self.config.xds.options,
            self.config.security.access.namespaces,
            access=self.access,
            load=load,
            on_reject=self.metrics.xds_reject,
        )
        return (SERVICE_NAME,)

    async def _start_http(self) -> None:
        assert self.config.http.port is not None
        http = HttpServer(
            self.config.http.host or self.config.listen.host,
            self.config.http.port,
            self.config.http.limits,
            on_limit=self.metrics.limit_hit,
        )
        add_routes(http, self.registry, lambda: self.address)
        self.metrics.add_route(http)
        try:
            self.http_port = await http.start()
        except OSError as e:
            where = _host_port(http.host.strip("[]"), self.config.http.port)
            if not self.config.http.optional:
                raise OSError(f"cannot bind the HTTP status listener {where}: {e}") from e
            log.warning("no status page: cannot bind %s (%s); set --http-port/LB_HTTP_PORT", where, e)
            return
        self._http = http

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, end Watch streams, give in-flight calls ``grace`` seconds, stop the source."""
        grace = self.config.listen.grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._http is not None:
            await self._http.stop()
            self._http = None
        self.registry.close()
        if self.xds is not None:
            self.xds.close()  # type: ignore[attr-defined]
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
            await _drain_handlers(_HANDLER_DRAIN_SECONDS)
        if self._source_started:
            await self.registry.unsubscribe_all()
            await self.source.stop()
            self._source_started = False
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        """Wait until the gRPC server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()

    def status(self) -> list[TargetStatus]:
        """The status view of every subscribed target."""
        return self.registry.snapshot()


async def _drain_handlers(timeout: float) -> None:
    """Let the RPC handlers grpc has already ended in core (cancelled by the client or by the end of the
    grace period) run to their end: once the process leaves ``asyncio.run``, its final cancel-all would cut
    them half-way and grpc logs each as "Exception not handled by _handle_exceptions" with a traceback."""
    me = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not me and t.get_name().startswith(_GRPC_RPC_TASKS)]
    if not pending:
        return
    _, still = await asyncio.wait(pending, timeout=timeout)
    if still:
        log.warning("%d RPC handler(s) still running %.0f s after the server stopped", len(still), timeout)
