"""Assembles the lookaside gRPC server: Lookaside servicer, health, reflection, endpoint source, shutdown."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lookaside_grpc import protocol as pb
from lookaside_server._registry import Registry, TargetStatus
from lookaside_server._service import LookasideServicer
from lookaside_server._source import EndpointSource
from lookaside_server._static import StaticFileSource

log = logging.getLogger(__name__)

DEFAULT_PORT = 50055
DEFAULT_HOST = "[::]"


@dataclass
class ServerConfig:
    """What to listen on and where endpoints come from (``source`` wins over ``static_file``)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    static_file: str | os.PathLike[str] | None = None
    poll_interval: float = 1.0
    #: Seconds in-flight calls get to finish on stop.
    grace: float = 5.0
    #: A ready-made source (e.g. Kubernetes EndpointSlices); overrides ``static_file``.
    source: EndpointSource | None = field(default=None, compare=False)

    def make_source(self) -> EndpointSource:
        """The configured endpoint source; raise ValueError if none is configured."""
        if self.source is not None:
            return self.source
        if self.static_file:
            return StaticFileSource(self.static_file, poll_interval=self.poll_interval)
        raise ValueError("no endpoint source configured (set a static file)")


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
        self._server: grpc.aio.Server | None = None
        self._source_started = False
        self.port = 0

    @property
    def address(self) -> str:
        """``host:port`` actually bound (valid after start)."""
        return _host_port(self.config.host, self.port)

    async def start(self) -> int:
        """Start the source, bind and start serving; return the bound port."""
        await self.source.start(self.registry.publish)
        self._source_started = True
        try:
            server = grpc.aio.server()
            pb.add_LookasideServicer_to_server(LookasideServicer(self.registry), server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            reflection.enable_server_reflection(
                (pb.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME), server)
            bound = server.add_insecure_port(_host_port(self.config.host, self.config.port))
            if bound == 0:
                raise OSError(f"cannot bind {_host_port(self.config.host, self.config.port)}")
            await server.start()
        except BaseException:
            await self.source.stop()
            self._source_started = False
            raise
        self._server = server
        self.port = bound
        for service in ("", pb.SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s", self.address)
        return bound

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, end Watch streams, give in-flight calls ``grace`` seconds, stop the source."""
        grace = self.config.grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.registry.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
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
