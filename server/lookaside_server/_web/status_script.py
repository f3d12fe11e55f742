"""The status page's script (``/status.js``): keeps the page current by fetching ``/status.json`` every few
seconds and re-rendering the targets exactly as the server renders them (``status_page.render_html``).

Served from the page's own listener so the page's Content-Security-Policy can stay strict (``script-src
'self'``, ``connect-src 'self'``, no inline script). Every value goes into the DOM through ``textContent``
and attributes, never as markup. Without JavaScript the page is the same server-rendered HTML and refreshes
itself through a ``<noscript>`` meta refresh.
"""

#: Seconds between two fetches of ``/status.json`` (and the no-JavaScript meta refresh).
REFRESH_SECONDS = 5

STATUS_JS = """\
"use strict";
(function () {
  var INTERVAL = __SECONDS__ * 1000;
  var main = document.getElementById("status");
  var live = document.getElementById("live");
  if (!main || !window.fetch) { return; }

  function el(tag, cls, children) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    (children || []).forEach(function (c) {
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }
  function text(tag, cls, value) { return el(tag, cls, [String(value)]); }
  function iso(ts) { return new Date(ts * 1000).toISOString().replace(/\\.\\d+Z$/, "Z"); }
  function ago(seconds) {
    seconds = Math.max(0, seconds);
    var units = [["d", 86400], ["h", 3600], ["min", 60]];
    for (var i = 0; i < units.length; i++) {
      if (seconds >= units[i][1]) { return Math.floor(seconds / units[i][1]) + " " + units[i][0] + " ago"; }
    }
    return Math.floor(seconds) + " s ago";
  }
  function flag(value) { return text("span", value ? "yes" : "no", value ? "yes" : "no"); }
  function dash() { return text("span", "muted", "-"); }
  function num(value) { return text("td", "num", value); }
  function td(children) { return el("td", "", children); }
  function needsAttention(t) { return t.endpoints_ready === 0; }
  function mark() { return text("span", "badge", "no ready endpoint"); }

  function row(t, now) {
    var name = el("td", "", []);
    var link = text("a", "", t.target);
    link.href = "#" + t.target;
    name.appendChild(link);
    if (!t.exists) {
      name.appendChild(document.createTextNode(" "));
      name.appendChild(text("span", "gone", "(gone from the source)"));
    }
    if (needsAttention(t)) { name.appendChild(document.createTextNode(" ")); name.appendChild(mark()); }
    var health = el("td", "", []);
    var keys = Object.keys(t.source).sort();
    if (!keys.length) { health.appendChild(dash()); }
    keys.forEach(function (k, i) {
      if (i) { health.appendChild(el("br")); }
      health.appendChild(text("code", "", k));
      health.appendChild(document.createTextNode(": " + t.source[k]));
    });
    var tr = el("tr", needsAttention(t) ? "no-ready" : "", [
      name, num(t.version), num(t.endpoints_total), num(t.endpoints_ready), num(t.watchers),
      td([iso(t.changed_at) + " ", text("span", "muted", "(" + ago(now - t.changed_at) + ")")]),
      health,
    ]);
    tr.setAttribute("data-target", t.target);
    return tr;
  }

  function details(t, now) {
    var section = el("section", needsAttention(t) ? "target no-ready" : "target", []);
    var h2 = el("h2", "", [t.target + " "]);
    h2.id = t.target;
    if (needsAttention(t)) { h2.appendChild(mark()); h2.appendChild(document.createTextNode(" ")); }
    h2.appendChild(text("span", "muted", "version " + t.version + ", " + t.watchers +
                        " watcher(s), changed " + ago(now - t.changed_at)));
    section.appendChild(h2);
    if (!t.endpoints.length) { section.appendChild(text("p", "muted", "no endpoints")); return section; }
    var head = el("tr", "", ["ip", "port", "port name", "zone", "ready", "serving", "terminating"].map(
      function (h) { return text("th", "", h); }));
    var body = el("tbody", "", t.endpoints.map(function (e) {
      var zone = td([e.zone ? e.zone : dash()]);
      if (e.for_zones.length) {
        zone.appendChild(document.createTextNode(" "));
        zone.appendChild(text("span", "muted", "(hints: " + e.for_zones.join(", ") + ")"));
      }
      return el("tr", "", [
        td([text("code", "", e.ip)]), num(e.port), td([e.port_name ? e.port_name : dash()]), zone,
        td([flag(e.ready)]), td([flag(e.serving)]),
        td([e.terminating ? text("span", "no", "yes") : text("span", "muted", "no")]),
      ]);
    }));
    var table = el("table", "endpoints", [el("thead", "", [head]), body]);
    table.setAttribute("data-target", t.target);
    section.appendChild(table);
    return section;
  }

  function render(data) {
    var now = data.generated_at;
    var targets = data.targets.slice();
    // targets without a ready endpoint first, otherwise in the server's order (a stable sort)
    var fine = targets.filter(function (t) { return !needsAttention(t); });
    targets = targets.filter(needsAttention).concat(fine);
    var parts = [];
    if (!targets.length) {
      var none = text("p", "", "No targets tracked yet: a target appears here once a client resolves " +
                      "or watches it.");
      none.id = "no-targets";
      parts.push(none);
    } else {
      var bad = targets.filter(needsAttention);
      if (bad.length) {
        var alert = text("p", "attention", bad.length + " target(s) without a ready endpoint: " +
                         bad.map(function (t) { return t.target; }).join(", "));
        alert.id = "attention";
        parts.push(alert);
      }
      parts.push(text("h2", "", "Targets"));
      var head = el("tr", "", ["target", "version", "endpoints", "ready", "watchers", "last change",
                               "source health"].map(function (h) { return text("th", "", h); }));
      var rows = targets.map(function (t) { return row(t, now); });
      var table = el("table", "", [el("thead", "", [head]), el("tbody", "", rows)]);
      table.id = "targets";
      parts.push(table);
      targets.forEach(function (t) { parts.push(details(t, now)); });
    }
    main.replaceChildren.apply(main, parts);
    ["server-version", "source", "taken"].forEach(function (id) {
      var node = document.getElementById(id);
      if (!node) { return; }
      node.textContent = id === "taken" ? iso(now) : id === "source" ? data.source : data.server_version;
    });
  }

  function status(message, stale) {
    if (!live) { return; }
    live.textContent = message;
    live.className = stale ? "stale" : "muted";
  }

  var timer = null;
  function schedule() { timer = window.setTimeout(tick, INTERVAL); }
  function tick() {
    timer = null;
    if (document.hidden) { return; }  // resumed by visibilitychange
    fetch("status.json", {cache: "no-store", headers: {"Accept": "application/json"}})
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (data) {
        render(data);
        status("live: updated every " + INTERVAL / 1000 + " s", false);
      }, function (err) {
        status("live updates failing (" + err.message + "): showing the state of " +
               (document.getElementById("taken") || {}).textContent, true);
      })
      .then(schedule);
  }
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && timer === null) { tick(); }
  });
  document.documentElement.className = "js";
  status("live: updated every " + INTERVAL / 1000 + " s", false);
  schedule();
})();
""".replace("__SECONDS__", str(REFRESH_SECONDS))
