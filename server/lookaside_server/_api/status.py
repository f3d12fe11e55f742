"""The status view of a running lookaside server: :func:`collect` gathers it (on the server's event loop);
the Status RPC (``LookasideServicer.Status``) and ``/status.json`` (:func:`to_dict`, through the client's
:func:`~lookaside_grpc.protocol.status_to_dict`) render it; the HTML page lives in ``_web/status_page.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from lookaside_grpc import protocol as pb2
from lookaside_server._core.model import BackendEndpoint, Target
from lookaside_server._core.registry import Registry

log = logging.getLogger(__name__)


def server_version() -> str:
    """The installed version of the lookaside-grpc distribution."""
    try:
        return metadata.version("lookaside-grpc")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


#: One endpoint of a target with its EndpointSlice conditions: the registry's own record, shown as is.
EndpointView = BackendEndpoint


@dataclass(frozen=True, slots=True)
class TargetView:
    """One tracked target: its endpoints, version, last change, watchers and source health."""

    service: str
    namespace: str
    version: int
    changed_at: float
    watchers: int
    exists: bool
    endpoints: tuple[EndpointView, ...] = ()
    source: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``service.namespace``: the one target grammar."""
        return f"{self.service}.{self.namespace}"

    @property
    def ready(self) -> int:
        """How many endpoints are ready."""
        return sum(1 for e in self.endpoints if e.ready)


@dataclass(frozen=True, slots=True)
class StatusView:
    """Everything the status RPC, page and JSON show."""

    server_version: str
    source: str
    generated_at: float
    targets: tuple[TargetView, ...]


#: The Kubernetes source's ``kind`` (``kubernetes endpointslices``) in the API's own words.
_KUBE_OBJECTS = {"endpointslices": "Kubernetes EndpointSlices", "endpoints": "Kubernetes Endpoints (core/v1)"}


#: Namespaces a namespace-scoped Kubernetes source's description names before "and N more".
_NAMESPACES_SHOWN = 5


def describe_source(source: object) -> str:
    """The source in an operator's words: its ``description`` if it has one (``static file
    endpoints.yaml``); for the Kubernetes source, what it reads and where (``Kubernetes EndpointSlices,
    namespace team-a``, ``..., all namespaces``); else its ``kind`` or class name."""
    description = getattr(source, "description", None)
    if isinstance(description, str) and description:
        return description
    kind = str(getattr(source, "kind", "") or "")
    if kind.startswith("kubernetes "):
        what = _KUBE_OBJECTS.get(kind.removeprefix("kubernetes "), kind)
        if getattr(source, "cluster_wide", False):
            return f"{what}, all namespaces"
        namespaces = list(getattr(source, "watched_namespaces", ()))
        if not namespaces:
            return f"{what}, per namespace (none watched yet)"
        plural = "s" if len(namespaces) > 1 else ""
        shown = ", ".join(namespaces[:_NAMESPACES_SHOWN])
        more = len(namespaces) - _NAMESPACES_SHOWN
        return f"{what}, namespace{plural} {shown}" + (f" and {more} more" if more > 0 else "")
    return kind or type(source).__name__


def _source_kind(registry: Registry) -> str:
    try:
        return describe_source(registry.source)
    except Exception as e:  # noqa: BLE001 - a status view must not fail because a source misbehaves
        log.warning("describing the source failed: %s", e)
        return type(registry.source).__name__


def collect(registry: Registry, only: Target | None = None) -> StatusView:
    """Take the status view; call it on the server's event loop (the registry is not thread-safe)."""
    targets = []
    for state, watchers in registry.states():
        target = state.target
        if only is not None and target != only:
            continue
        try:
            described = registry.source.describe(target)
        except Exception as e:  # noqa: BLE001 - a status view must not fail because a source misbehaves
            log.warning("describe(%s) failed: %s", target, e)
            described = {"describe_error": f"{type(e).__name__}: {e}"}
        endpoints = tuple(state.endpoints or ())
        targets.append(
            TargetView(
                service=target.service,
                namespace=target.namespace,
                version=state.version,
                changed_at=state.changed_at,
                watchers=watchers,
                exists=state.endpoints is not None,
                endpoints=endpoints,
                source={str(k): str(v) for k, v in described.items()},
            )
        )
    return StatusView(server_version(), _source_kind(registry), time.time(), tuple(targets))


# --- the RPC -------------------------------------------------------------------------------------------


def to_proto(view: StatusView) -> pb2.StatusResponse:
    """The Status RPC's answer."""
    return pb2.StatusResponse(
        server_version=view.server_version,
        source=view.source,
        generated_at=view.generated_at,
        targets=[
            pb2.TargetStatus(
                service=t.service,
                namespace=t.namespace,
                version=t.version,
                changed_at=t.changed_at,
                watchers=t.watchers,
                exists=t.exists,
                source=dict(t.source),
                endpoints=[_endpoint_to_proto(e) for e in t.endpoints],
            )
            for t in view.targets
        ],
    )


#: The fields of :class:`EndpointView` that ``EndpointStatus`` carries (all but ``service_port``).
_STATUS_FIELDS = tuple(
    f.name for f in dataclasses.fields(EndpointView) if f.name in pb2.EndpointStatus.DESCRIPTOR.fields_by_name
)


def _endpoint_to_proto(e: EndpointView) -> pb2.EndpointStatus:
    return pb2.EndpointStatus(**{name: getattr(e, name) for name in _STATUS_FIELDS})


def _endpoint_from_proto(e: pb2.EndpointStatus) -> EndpointView:
    """``EndpointStatus`` carries the fields of :class:`EndpointView` (repeated ones as tuples) but the
    Service port number."""
    values = {name: getattr(e, name) for name in _STATUS_FIELDS}
    values["for_zones"] = tuple(values["for_zones"])
    return EndpointView(**values)


def from_proto(resp: pb2.StatusResponse) -> StatusView:
    """Back from the RPC's answer to the view (so the CLI renders exactly what the server's JSON has)."""
    return StatusView(
        server_version=resp.server_version,
        source=resp.source,
        generated_at=resp.generated_at,
        targets=tuple(
            TargetView(
                service=t.service,
                namespace=t.namespace,
                version=t.version,
                changed_at=t.changed_at,
                watchers=t.watchers,
                exists=t.exists,
                source=dict(sorted(t.source.items())),
                endpoints=tuple(_endpoint_from_proto(e) for e in t.endpoints),
            )
            for t in resp.targets
        ),
    )


# --- JSON ----------------------------------------------------------------------------------------------

#: ``2026-12-02T04:05:06Z``, and ``42 s ago``: the formatting the CLI uses too.
iso = pb2.iso_time
ago = pb2.ago


def to_dict(view: StatusView) -> dict[str, Any]:
    """The JSON form (``/status.json``): the Status RPC's answer through the one JSON view
    :func:`lookaside_grpc.protocol.status_to_dict`, which ``lookaside status --json`` prints as well."""
    return pb2.status_to_dict(to_proto(view))
