"""The status view of a running lookaside server, and its three renderings: the Status RPC, JSON and HTML.

:func:`collect` is the one function that gathers the data (on the server's event loop); the RPC
(:class:`StatusServicer`), ``/status.json`` (:func:`to_dict`) and the ``/`` page (:func:`render_html`) only
render the :class:`StatusView` it returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import html
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import grpc

from lookaside_grpc import protocol as pb2
from lookaside_server._errors import abort
from lookaside_server._http import HttpRequest, HttpResponse, HttpServer, LoopBridge
from lookaside_server._model import BackendEndpoint, Target
from lookaside_server._registry import Registry
from lookaside_server._service import LookasideServicer

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
        """``namespace/service``."""
        return f"{self.namespace}/{self.service}"

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


def _source_kind(registry: Registry) -> str:
    return str(getattr(registry.source, "kind", "") or type(registry.source).__name__)


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
                endpoints=[pb2.EndpointStatus(**dataclasses.asdict(e)) for e in t.endpoints],
            )
            for t in view.targets
        ],
    )


def _endpoint_from_proto(e: pb2.EndpointStatus) -> EndpointView:
    """``EndpointStatus`` carries exactly the fields of :class:`EndpointView` (repeated ones as tuples)."""
    values = {f.name: getattr(e, f.name) for f in dataclasses.fields(EndpointView)}
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


class StatusServicer(LookasideServicer):
    """The Lookaside servicer plus the operators' Status RPC."""

    def __init__(self, registry: Registry, **kwargs: Any) -> None:
        super().__init__(registry, **kwargs)
        self._status_registry = registry

    async def Status(
        self, request: pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb2.StatusResponse:
        """Every tracked target (or the one asked for) with endpoints, watchers and source health."""
        only = None
        if request.service or request.namespace:
            # The same checks as Resolve/Watch: names, then the namespace allow-list.
            only = await self._target(request.service, request.namespace, context)
        view = collect(self._status_registry, only)
        if only is not None and not view.targets:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"target {only} is not tracked: no client has resolved or watched it yet",
            )
        return to_proto(view)


# --- JSON ----------------------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return (
        datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def to_dict(view: StatusView) -> dict[str, Any]:
    """The JSON form (``/status.json`` and ``lookaside status --json``)."""
    return {
        "server_version": view.server_version,
        "source": view.source,
        "generated_at": view.generated_at,
        "targets": [
            {
                "target": t.name,
                "service": t.service,
                "namespace": t.namespace,
                "exists": t.exists,
                "version": t.version,
                "endpoints_total": len(t.endpoints),
                "endpoints_ready": t.ready,
                "changed_at": t.changed_at,
                "changed_at_iso": _iso(t.changed_at),
                "watchers": t.watchers,
                "source": dict(t.source),
                "endpoints": [
                    {
                        "ip": e.ip,
                        "port": e.port,
                        "port_name": e.port_name,
                        "zone": e.zone,
                        "for_zones": list(e.for_zones),
                        "ready": e.ready,
                        "serving": e.serving,
                        "terminating": e.terminating,
                    }
                    for e in t.endpoints
                ],
            }
            for t in view.targets
        ],
    }


# --- HTML ----------------------------------------------------------------------------------------------


def ago(seconds: float) -> str:
    """``42 s ago``, ``3 min ago``, ``2 h ago``, ``5 d ago``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em 2em;
     color:#1b1f24;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}
.meta{color:#57606a;margin-bottom:1em}
table{border-collapse:collapse;margin:.3em 0 1em}
th,td{border:1px solid #d0d7de;padding:.3em .7em;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right}
.yes{color:#1a7f37;font-weight:600}.no{color:#cf222e;font-weight:600}.muted{color:#57606a}
.gone{color:#cf222e;font-weight:600}code{font-size:.95em}
"""


_DASH = '<span class="muted">-</span>'
_MUTED_NO = '<span class="muted">no</span>'
_TERMINATING = '<span class="no">yes</span>'


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _flag(value: bool) -> str:
    return '<span class="yes">yes</span>' if value else '<span class="no">no</span>'


def _when(ts: float, now: float) -> str:
    return f'{_e(_iso(ts))} <span class="muted">({_e(ago(now - ts))})</span>'


def _source_cell(source: Mapping[str, str]) -> str:
    if not source:
        return '<span class="muted">-</span>'
    return "<br>".join(f"<code>{_e(k)}</code>: {_e(v)}" for k, v in sorted(source.items()))


def render_html(view: StatusView, grpc_address: str = "") -> str:
    """The status page: plain server-rendered HTML, every value escaped."""
    now = view.generated_at
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>lookaside status</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>lookaside server status</h1>",
        '<p class="meta">'
        f"version <b>{_e(view.server_version)}</b> &middot; source <b>{_e(view.source)}</b>"
        + (f" &middot; gRPC on <code>{_e(grpc_address)}</code>" if grpc_address else "")
        + f" &middot; taken {_e(_iso(now))} &middot; "
        '<a href="status.json">status.json</a></p>',
    ]
    if not view.targets:
        out.append(
            '<p id="no-targets">No targets tracked yet: a target appears here once a client resolves or '
            "watches it.</p>"
        )
    else:
        out.append(
            '<h2>Targets</h2><table id="targets"><thead><tr><th>target</th><th>version</th>'
            "<th>endpoints</th><th>ready</th><th>watchers</th><th>last change</th>"
            "<th>source health</th></tr></thead><tbody>"
        )
        for t in view.targets:
            state = "" if t.exists else ' <span class="gone">(gone from the source)</span>'
            out.append(
                f'<tr><td><a href="#{_e(t.name)}">{_e(t.name)}</a>{state}</td>'
                f'<td class="num">{t.version}</td>'
                f'<td class="num">{len(t.endpoints)}</td><td class="num">{t.ready}</td>'
                f'<td class="num">{t.watchers}</td><td>{_when(t.changed_at, now)}</td>'
                f"<td>{_source_cell(t.source)}</td></tr>"
            )
        out.append("</tbody></table>")
        for t in view.targets:
            out.append(
                f'<h2 id="{_e(t.name)}">{_e(t.name)} <span class="muted">version {t.version}, '
                f"{t.watchers} watcher(s), changed {_e(ago(now - t.changed_at))}</span></h2>"
            )
            if not t.endpoints:
                out.append('<p class="muted">no endpoints</p>')
                continue
            out.append(
                f'<table class="endpoints" data-target="{_e(t.name)}"><thead><tr><th>ip</th>'
                "<th>port</th><th>port name</th><th>zone</th><th>ready</th><th>serving</th>"
                "<th>terminating</th></tr></thead><tbody>"
            )
            for e in t.endpoints:
                zone = _e(e.zone) if e.zone else _DASH
                if e.for_zones:
                    zone += f' <span class="muted">(hints: {_e(", ".join(e.for_zones))})</span>'
                out.append(
                    f'<tr><td><code>{_e(e.ip)}</code></td><td class="num">{e.port}</td>'
                    f"<td>{_e(e.port_name) or _DASH}</td><td>{zone}</td>"
                    f"<td>{_flag(e.ready)}</td><td>{_flag(e.serving)}</td>"
                    f"<td>{_TERMINATING if e.terminating else _MUTED_NO}</td></tr>"
                )
            out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out)


# --- the HTTP routes -----------------------------------------------------------------------------------


def add_routes(
    http: HttpServer,
    registry: Registry,
    loop: asyncio.AbstractEventLoop,
    grpc_address: Callable[[], str] = lambda: "",
    timeout: float = 5.0,
) -> None:
    """Serve ``/`` (HTML), ``/status.json`` and ``/healthz`` on ``http``, reading the registry on ``loop``."""
    bridge = LoopBridge(loop, timeout)

    async def take() -> StatusView:
        return collect(registry)

    async def ping() -> bool:
        return True

    def view() -> StatusView | HttpResponse:
        try:
            return bridge.call(take)
        except (TimeoutError, RuntimeError) as e:
            return HttpResponse.text(503, f"status unavailable: {e}\n")

    def page(req: HttpRequest) -> HttpResponse:
        v = view()
        if isinstance(v, HttpResponse):
            return v
        return HttpResponse(
            200,
            render_html(v, grpc_address()).encode(),
            "text/html; charset=utf-8",
            {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
        )

    def status_json(req: HttpRequest) -> HttpResponse:
        v = view()
        if isinstance(v, HttpResponse):
            return v
        return HttpResponse(200, (json.dumps(to_dict(v), indent=2) + "\n").encode(), "application/json")

    def healthz(req: HttpRequest) -> HttpResponse:
        try:
            bridge.call(ping)
        except (TimeoutError, RuntimeError) as e:
            return HttpResponse.text(503, f"unhealthy: {e}\n")
        return HttpResponse.text(200, "ok\n")

    http.route("/", page)
    http.route("/status.json", status_json)
    http.route("/healthz", healthz)
