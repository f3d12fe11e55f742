"""The status page (``/``), its script (``/status.js``), ``/status.json`` and ``/healthz`` on the HTTP
listener, rendered from the :class:`StatusView` that ``_api/status.py`` collects on the server's event loop.

The page is complete server-rendered HTML; the script keeps it current from ``/status.json`` (without
JavaScript a ``<noscript>`` meta refresh reloads it). Targets without a ready endpoint come first, marked
(row class ``no-ready``, a ``no ready endpoint`` badge and a summary line ``#attention``).
"""

from __future__ import annotations

import asyncio
import html
import json
from collections.abc import Callable, Mapping

from lookaside_server._api.status import StatusView, TargetView, ago, collect, iso, to_dict
from lookaside_server._core.registry import Registry
from lookaside_server._web.http import HttpRequest, HttpResponse, HttpServer
from lookaside_server._web.render_budget import RenderBudget
from lookaside_server._web.status_script import REFRESH_SECONDS, STATUS_JS

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
.badge{display:inline-block;background:#cf222e;color:#fff;border-radius:.8em;padding:0 .6em;
       font-size:.8em;font-weight:600;white-space:nowrap;vertical-align:.1em}
tr.no-ready td{background:#fff1f0}tr.no-ready td:first-child{box-shadow:inset 4px 0 #cf222e}
.attention{background:#fff1f0;border:1px solid #ffcecb;border-left:4px solid #cf222e;padding:.4em .8em}
#live{font-size:.9em}.stale{color:#9a6700;font-weight:600}#taken,.meta code{white-space:nowrap}
"""


_DASH = '<span class="muted">-</span>'
_MUTED_NO = '<span class="muted">no</span>'
_TERMINATING = '<span class="no">yes</span>'


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _flag(value: bool) -> str:
    return '<span class="yes">yes</span>' if value else '<span class="no">no</span>'


def _when(ts: float, now: float) -> str:
    return f'{_e(iso(ts))} <span class="muted">({_e(ago(now - ts))})</span>'


def _source_cell(source: Mapping[str, str]) -> str:
    if not source:
        return '<span class="muted">-</span>'
    return "<br>".join(f"<code>{_e(k)}</code>: {_e(v)}" for k, v in sorted(source.items()))


def needs_attention(t: TargetView) -> bool:
    """A target without a ready endpoint (none at all, none ready, or gone from the source)."""
    return t.ready == 0


def _mark(t: TargetView) -> str:
    return ' <span class="badge">no ready endpoint</span>' if needs_attention(t) else ""


def render_html(view: StatusView, grpc_address: str = "") -> str:
    """The status page: plain server-rendered HTML, every value escaped; targets without a ready endpoint
    first and marked (``status.js`` renders the same from ``/status.json``)."""
    now = view.generated_at
    targets = sorted(view.targets, key=lambda t: not needs_attention(t))  # stable: otherwise as collected
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS}"></noscript>',
        "<title>lookaside status</title>",
        f'<style>{_CSS}</style><script src="status.js" defer></script></head><body>',
        "<h1>lookaside server status</h1>",
        '<p class="meta">'
        f'version <b id="server-version">{_e(view.server_version)}</b> &middot; '
        f'source <b id="source">{_e(view.source)}</b>'
        + (f" &middot; gRPC on <code>{_e(grpc_address)}</code>" if grpc_address else "")
        + f' &middot; taken <span id="taken">{_e(iso(now))}</span> &middot; '
        '<a href="status.json">status.json</a> &middot; <span id="live" class="muted">'
        f"refreshed every {REFRESH_SECONDS} s</span></p>",
        '<main id="status">',
    ]
    if not targets:
        out.append(
            '<p id="no-targets">No targets tracked yet: a target appears here once a client resolves or '
            "watches it.</p>"
        )
    else:
        bad = [t.name for t in targets if needs_attention(t)]
        if bad:
            out.append(
                f'<p id="attention" class="attention">{len(bad)} target(s) without a ready endpoint: '
                f"{_e(', '.join(bad))}</p>"
            )
        out.append(
            '<h2>Targets</h2><table id="targets"><thead><tr><th>target</th><th>version</th>'
            "<th>endpoints</th><th>ready</th><th>watchers</th><th>last change</th>"
            "<th>source health</th></tr></thead><tbody>"
        )
        for t in targets:
            state = "" if t.exists else ' <span class="gone">(gone from the source)</span>'
            row_class = ' class="no-ready"' if needs_attention(t) else ""
            out.append(
                f'<tr{row_class} data-target="{_e(t.name)}"><td><a href="#{_e(t.name)}">{_e(t.name)}</a>'
                f"{state}{_mark(t)}</td>"
                f'<td class="num">{t.version}</td>'
                f'<td class="num">{len(t.endpoints)}</td><td class="num">{t.ready}</td>'
                f'<td class="num">{t.watchers}</td><td>{_when(t.changed_at, now)}</td>'
                f"<td>{_source_cell(t.source)}</td></tr>"
            )
        out.append("</tbody></table>")
        for t in targets:
            section_class = "target no-ready" if needs_attention(t) else "target"
            out.append(
                f'<section class="{section_class}"><h2 id="{_e(t.name)}">{_e(t.name)} '
                + (_mark(t).strip() + " " if needs_attention(t) else "")
                + f'<span class="muted">version {t.version}, '
                f"{t.watchers} watcher(s), changed {_e(ago(now - t.changed_at))}</span></h2>"
            )
            if not t.endpoints:
                out.append('<p class="muted">no endpoints</p></section>')
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
            out.append("</tbody></table></section>")
    out.append("</main></body></html>")
    return "\n".join(out)


# --- the HTTP routes -----------------------------------------------------------------------------------

#: Status pages with more endpoints than this are rendered in a worker thread (the snapshot is taken on the
#: loop; rendering thousands of rows there would delay RPCs).
RENDER_INLINE_MAX = 200

#: Nothing loads but the inline style, the page's own script (``/status.js``) and its fetches of
#: ``/status.json``: no inline script, no other origin.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; connect-src 'self'"
_SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def add_routes(
    http: HttpServer,
    registry: Registry,
    grpc_address: Callable[[], str] = lambda: "",
) -> None:
    """Serve ``/`` (HTML), ``/status.js`` (its script), ``/status.json`` and ``/healthz`` on ``http``; the
    handlers run on the server's event loop and read the registry directly."""

    budget = RenderBudget(http.limits.renders_per_second, on_limit=http.limit_hit)

    async def render(make: Callable[[StatusView], HttpResponse]) -> HttpResponse:
        async def fresh() -> HttpResponse:
            view = collect(registry)  # on the loop: a consistent snapshot of immutable views
            if sum(len(t.endpoints) for t in view.targets) <= RENDER_INLINE_MAX:
                return make(view)
            return await asyncio.to_thread(make, view)

        return await budget.get(make, fresh)

    def html_page(view: StatusView) -> HttpResponse:
        return HttpResponse(
            200,
            render_html(view, grpc_address()).encode(),
            "text/html; charset=utf-8",
            _SECURITY_HEADERS,
        )

    def json_doc(view: StatusView) -> HttpResponse:
        return HttpResponse(200, (json.dumps(to_dict(view), indent=2) + "\n").encode(), "application/json")

    async def page(req: HttpRequest) -> HttpResponse:
        return await render(html_page)

    async def status_json(req: HttpRequest) -> HttpResponse:
        return await render(json_doc)

    script = HttpResponse(200, STATUS_JS.encode(), "text/javascript; charset=utf-8", _SECURITY_HEADERS)

    def status_js(req: HttpRequest) -> HttpResponse:
        return script

    def healthz(req: HttpRequest) -> HttpResponse:
        # Answered on the loop itself: if the loop is stuck there is no answer, which is the signal.
        return HttpResponse.text(200, "ok\n")

    http.route("/", page)
    http.route("/status.js", status_js)
    http.route("/status.json", status_json)
    http.route("/healthz", healthz)
