"""The HTTP status page of the lookaside server: /, /status.json, /healthz, escaping, and a real browser."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import Message
from typing import TypeVar

import grpc
import pytest

from lookaside_dev.backends import Backend
from lookaside_dev.static_files import write_addresses
from lookaside_grpc import protocol as pb
from lookaside_grpc._generated import lookaside_pb2 as pb2
from lookaside_server import (
    HttpConfig,
    ListenConfig,
    RunningServer,
    ServerConfig,
    StaticFileConfig,
    StaticFileSource,
    Target,
    run_in_thread,
)
from lookaside_server._api.status import from_proto, to_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET = "default/greet"  # the static file key
NAME = "greet.default"  # how the server names it
HOSTILE = "<script>alert('x')</script>"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL_HINT = (
    "run `apt-get update && apt-get install -y chromium chromium-driver` and "
    "`pip install selenium` (the browser test never skips)"
)


class DescribedSource(StaticFileSource):
    """A static source whose describe() returns hostile-looking health, as a Kubernetes error text might."""

    def describe(self, target: Target) -> dict[str, str | int | float]:
        return {"last_error": "<img src=x onerror=alert(1)>", "restarts": 2}


def fetch(url: str, method: str = "GET") -> tuple[int, Message, str]:
    """Status, headers and body of a request (also for error statuses)."""
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def get(url: str, method: str = "GET") -> tuple[int, str, str]:
    """Status, content type and body of a request (also for error statuses)."""
    status, headers, body = fetch(url, method)
    return status, headers["Content-Type"], body


def base_url(s: RunningServer) -> str:
    assert s.server.http_port
    return f"http://127.0.0.1:{s.server.http_port}"


@pytest.fixture
def static_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "endpoints.yaml"


@pytest.fixture
def start(static_file: pathlib.Path) -> Iterator[Callable[..., RunningServer]]:
    running: list[RunningServer] = []

    def run(**kwargs: object) -> RunningServer:
        config = ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0),
            source=kwargs.pop("source", StaticFileConfig(static_file, poll_interval=0.02)),
            http=HttpConfig(port=0),
            **kwargs,
        )  # type: ignore[arg-type]
        s = run_in_thread(config)
        running.append(s)
        return s

    yield run
    for s in running:
        s.stop()


def watch_until(address: str, version: int, timeout: float = 10.0) -> None:
    """Block on a Watch stream until the target reaches ``version`` (no sleeping)."""
    with grpc.insecure_channel(address) as ch:
        stream = pb.LookasideStub(ch).Watch(
            pb.WatchRequest(service="greet", namespace="default"), timeout=timeout
        )
        for update in stream:
            if update.version >= version:
                stream.cancel()
                return
    pytest.fail(f"version {version} never came")


def test_routes_and_json(
    start: Callable[..., RunningServer], static_file: pathlib.Path, backends: Callable[..., Backend]
) -> None:
    group = [backends(), backends()]
    write_addresses(static_file, {TARGET: [b.address for b in group]}, port_name="grpc", zone="zone-a")
    s = start()
    url = base_url(s)
    assert get(url + "/healthz")[::2] == (200, "ok\n")
    status, ctype, body = get(url + "/status.json")
    assert status == 200 and ctype == "application/json"
    assert json.loads(body)["targets"] == []
    assert get(url + "/nope")[0] == 404
    assert get(url + "/", method="POST")[0] == 405
    status, headers, body = fetch(url + "/")
    assert (
        status == 200 and headers["Content-Type"].startswith("text/html") and "No targets tracked yet" in body
    )
    # The page's security headers: nothing but inline style, its own script and its own fetches may load;
    # no inline script, no sniffing, framing or caching.
    assert headers["Content-Security-Policy"] == (
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; connect-src 'self'"
    )
    assert '<script src="status.js" defer></script>' in body and body.count("<script") == 1
    assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in body  # without JavaScript
    assert 'source <b id="source">static file ' in body and "endpoints.yaml</b>" in body
    status, js_headers, script = fetch(url + "/status.js")
    assert status == 200 and js_headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert 'fetch("status.json"' in script and "innerHTML" not in script
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    assert headers["Cache-Control"] == "no-store" and headers["Server"] == "lookaside"
    status, headers, body = fetch(url + "/healthz", method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, "", "3")

    with grpc.insecure_channel(s.address) as ch:
        stub = pb.LookasideStub(ch)
        stream = stub.Watch(pb.WatchRequest(service="greet", namespace="default"), timeout=30)
        next(stream)  # subscribed: one watcher
        data = json.loads(get(url + "/status.json")[2])
        rpc = to_dict(from_proto(stub.Status(pb2.StatusRequest(), timeout=10)))
        stream.cancel()
    (t,) = data["targets"]
    assert (t["target"], t["version"], t["watchers"], t["endpoints_total"], t["endpoints_ready"]) == (
        NAME,
        1,
        1,
        2,
        2,
    )
    assert [(e["ip"], e["port"], e["port_name"], e["zone"]) for e in t["endpoints"]] == [
        ("127.0.0.1", b.port, "grpc", "zone-a") for b in group
    ]
    assert all(e["ready"] and e["serving"] and not e["terminating"] for e in t["endpoints"])
    # One view function: the RPC and the JSON carry the same data.
    for view in (data, rpc):
        view.pop("generated_at")
    assert rpc == data


def test_targets_without_a_ready_endpoint_come_first_and_marked(
    start: Callable[..., RunningServer], static_file: pathlib.Path
) -> None:
    static_file.write_text(
        json.dumps(
            {
                "default/api": [{"ip": "10.0.0.1", "port": 50051}],
                TARGET: [{"ip": "10.0.0.2", "port": 50051, "ready": False}],
                "default/empty": [],
            }
        )
    )
    s = start()
    with grpc.insecure_channel(s.address) as ch:
        stub = pb.LookasideStub(ch)
        stub.Resolve(pb.Request(service="api", namespace="default"), timeout=10)
        for service in ("greet", "empty"):
            with pytest.raises(grpc.RpcError) as e:
                stub.Resolve(pb.Request(service=service, namespace="default"), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # tracked, nothing ready
    page = get(base_url(s) + "/")[2]
    rows = re.findall(r'<tr( class="no-ready")? data-target="([^"]+)">', page)
    assert rows == [(' class="no-ready"', "empty.default"), (' class="no-ready"', NAME), ("", "api.default")]
    assert page.count('<span class="badge">no ready endpoint</span>') == 4  # the rows and the sections
    assert '<p id="attention" class="attention">2 target(s) without a ready endpoint: empty.default, ' in page
    assert page.index('<section class="target no-ready"><h2 id="greet.default">') < page.index(
        '<section class="target"><h2 id="api.default">'
    )
    # /status.json keeps the server's order (by name): the page orders, the data does not
    data = json.loads(get(base_url(s) + "/status.json")[2])
    assert [t["target"] for t in data["targets"]] == ["api.default", "empty.default", NAME]


def test_sources_are_named_in_operator_words() -> None:
    from lookaside_server._api.status import describe_source

    class Kube:
        def __init__(self, kind: str, cluster_wide: bool, namespaces: list[str]) -> None:
            self.kind, self.cluster_wide, self.watched_namespaces = kind, cluster_wide, namespaces

    assert describe_source(StaticFileSource("endpoints.yaml")) == "static file endpoints.yaml"
    assert describe_source(Kube("kubernetes endpointslices", False, ["team-a"])) == (
        "Kubernetes EndpointSlices, namespace team-a"
    )
    assert describe_source(Kube("kubernetes endpointslices", False, ["a", "b"])) == (
        "Kubernetes EndpointSlices, namespaces a, b"
    )
    assert describe_source(Kube("kubernetes endpointslices", False, [f"ns{i}" for i in range(8)])) == (
        "Kubernetes EndpointSlices, namespaces ns0, ns1, ns2, ns3, ns4 and 3 more"
    )
    assert describe_source(Kube("kubernetes endpointslices", False, [])) == (
        "Kubernetes EndpointSlices, per namespace (none watched yet)"
    )
    assert describe_source(Kube("kubernetes endpoints", True, ["*"])) == (
        "Kubernetes Endpoints (core/v1), all namespaces"
    )
    # the real Kubernetes source carries what the description reads (no API call before a target is used)
    from lookaside_server._sources.kubernetes import KubernetesSource

    assert describe_source(KubernetesSource(api_client=object())) == (
        "Kubernetes EndpointSlices, per namespace (none watched yet)"
    )
    assert describe_source(KubernetesSource(api_client=object(), cluster_wide=True, kind="endpoints")) == (
        "Kubernetes Endpoints (core/v1), all namespaces"
    )


def test_html_escapes_everything(start: Callable[..., RunningServer], static_file: pathlib.Path) -> None:
    static_file.write_text(
        json.dumps({TARGET: [{"ip": "10.0.0.1", "port": 50051, "zone": HOSTILE, "for_zones": [HOSTILE]}]})
    )
    s = start(source=DescribedSource(static_file, poll_interval=0.02))
    with grpc.insecure_channel(s.address) as ch:
        pb.LookasideStub(ch).Resolve(pb.Request(service="greet", namespace="default"), timeout=10)
    status, _, page = get(base_url(s) + "/")
    assert status == 200
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "restarts" in page
    data = json.loads(get(base_url(s) + "/status.json")[2])
    assert data["targets"][0]["endpoints"][0]["zone"] == HOSTILE  # JSON keeps the raw value
    assert data["targets"][0]["source"] == {"last_error": "<img src=x onerror=alert(1)>", "restarts": "2"}


def test_large_page_rendered_off_the_loop(
    start: Callable[..., RunningServer], static_file: pathlib.Path
) -> None:
    """Above RENDER_INLINE_MAX endpoints the page is rendered in a worker thread from the loop's snapshot."""
    eps = [{"ip": f"10.1.{i // 250}.{i % 250 + 1}", "port": 50051, "zone": HOSTILE} for i in range(600)]
    static_file.write_text(json.dumps({TARGET: eps}))
    s = start()
    with grpc.insecure_channel(s.address) as ch:
        pb.LookasideStub(ch).Resolve(pb.Request(service="greet", namespace="default"), timeout=10)
    status, _, page = get(base_url(s) + "/")
    assert status == 200 and page.count("<tr><td><code>10.1.") == 600 and "<script>" not in page
    data = json.loads(get(base_url(s) + "/status.json")[2])
    assert data["targets"][0]["endpoints_total"] == 600


def _browser(tmp_path: pathlib.Path, javascript: bool = True):  # type: ignore[no-untyped-def]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {INSTALL_HINT}")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = "chromium-profile" if javascript else "chromium-profile-nojs"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations land in the console
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _endpoint(port: int, zone: str, **conditions: bool) -> dict[str, object]:
    return {"ip": "127.0.0.1", "port": port, "port_name": "grpc", "zone": zone, **conditions}


def test_status_page_in_a_browser(
    start: Callable[..., RunningServer],
    static_file: pathlib.Path,
    backends: Callable[..., Backend],
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page in Chromium: it keeps itself current from /status.json (no reload) under its strict CSP, a
    target that loses its last ready endpoint moves to the top, marked; without JavaScript it still shows
    everything."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    T = TypeVar("T")

    group = [backends(), backends(), backends()]
    api = [_endpoint(group[2].port, "eu-west-1c")]

    def write(greet: list[dict[str, object]]) -> None:
        static_file.write_text(json.dumps({"default/api": api, TARGET: greet}))

    write([_endpoint(group[0].port, "eu-west-1a"), _endpoint(group[1].port, "eu-west-1b")])
    monkeypatch.chdir(static_file.parent)  # named as an operator would: --static-file endpoints.yaml
    s = start(source=StaticFileConfig(static_file.name, poll_interval=0.02))

    def stable(read: Callable[[], T]) -> T:
        """``read()``, again if the page re-rendered under it (the script replaces the tables)."""
        for _ in range(20):
            try:
                return read()
            except StaleElementReferenceException:
                continue
        return read()

    def target_rows(driver) -> list[tuple[str, str, list[str]]]:  # type: ignore[no-untyped-def]
        """(target, class, cells) of each row of the targets table."""
        return stable(lambda: _target_rows(driver))

    def _target_rows(driver) -> list[tuple[str, str, list[str]]]:  # type: ignore[no-untyped-def]
        return [
            (
                r.get_attribute("data-target"),
                r.get_attribute("class") or "",
                [c.text for c in r.find_elements(By.TAG_NAME, "td")],
            )
            for r in driver.find_elements(By.CSS_SELECTOR, "table#targets tbody tr")
        ]

    with grpc.insecure_channel(s.address) as ch:
        stub = pb.LookasideStub(ch)
        stub.Resolve(pb.Request(service="api", namespace="default"), timeout=10)
        stream = stub.Watch(pb.WatchRequest(service="greet", namespace="default"), timeout=90)
        next(stream)  # the target is tracked and has one watcher
        driver = _browser(tmp_path)
        try:
            driver.set_page_load_timeout(20)
            driver.get(base_url(s) + "/")
            assert driver.title == "lookaside status"
            rows = target_rows(driver)
            assert [r[0] for r in rows] == ["api.default", NAME]
            assert rows[1][2][1:5] == ["1", "2", "2", "1"]  # version, endpoints, ready, watchers
            text = stable(lambda: driver.find_element(By.TAG_NAME, "body").text)
            for b in group[:2]:
                assert f"127.0.0.1 {b.port} grpc" in text
            assert "eu-west-1a" in text and "no ready endpoint" not in text
            assert "source static file endpoints.yaml" in text
            wait = WebDriverWait(driver, 20, 0.2, ignored_exceptions=[StaleElementReferenceException])
            wait.until(lambda d: "live: updated every 5 s" in d.find_element(By.ID, "live").text)

            # The file changes: a third greet backend arrives, terminating, not ready; the page follows
            # by itself (no reload).
            write(
                [
                    _endpoint(group[0].port, "eu-west-1a"),
                    _endpoint(group[1].port, "eu-west-1b"),
                    _endpoint(group[2].port, "eu-west-1c", ready=False, serving=True, terminating=True),
                ]
            )
            watch_until(s.address, version=2)
            wait.until(lambda d: target_rows(d)[1][2][1:4] == ["2", "3", "2"])
            last = stable(
                lambda: [
                    c.text
                    for c in driver.find_elements(
                        By.CSS_SELECTOR, f'table.endpoints[data-target="{NAME}"] tbody tr:last-child td'
                    )
                ]
            )
            assert last == ["127.0.0.1", str(group[2].port), "grpc", "eu-west-1c", "no", "yes", "yes"]

            # No greet endpoint is ready any more: greet moves to the top, marked.
            write(
                [
                    _endpoint(group[0].port, "eu-west-1a", ready=False),
                    _endpoint(group[1].port, "eu-west-1b", ready=False, serving=True, terminating=True),
                ]
            )
            watch_until(s.address, version=3)
            wait.until(lambda d: [r[0] for r in target_rows(d)] == [NAME, "api.default"])
            rows = target_rows(driver)
            assert rows[0][1] == "no-ready" and rows[0][2][0] == f"{NAME} no ready endpoint"
            assert rows[1][1] == "" and rows[1][2][0] == "api.default"
            attention = stable(lambda: driver.find_element(By.ID, "attention").text)
            assert attention == f"1 target(s) without a ready endpoint: {NAME}"
            marked = stable(
                lambda: [
                    m.text for m in driver.find_elements(By.CSS_SELECTOR, "section.target.no-ready h2 .badge")
                ]
            )
            assert marked == ["no ready endpoint"]
            # the strict CSP let the script and its fetches through and refused nothing
            assert not [e for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
            shot = tmp_path / "status-page.png"
            assert driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 1000
            # The README's picture is refreshed on request only, so a test run leaves the tree clean.
            if os.environ.get("LOOKASIDE_UPDATE_SCREENSHOT"):
                shutil.copyfile(shot, ROOT / "docs" / "status-page.png")
        finally:
            driver.quit()

        # Without JavaScript: the same server-rendered page, marked, with a meta refresh.
        driver = _browser(tmp_path, javascript=False)
        try:
            driver.set_page_load_timeout(20)
            driver.get(base_url(s) + "/")
            rows = target_rows(driver)
            assert [(r[0], r[1]) for r in rows] == [(NAME, "no-ready"), ("api.default", "")]
            assert driver.find_element(By.ID, "live").text == "refreshed every 5 s"  # the script never ran
            assert driver.find_element(By.ID, "attention").text.endswith(f"without a ready endpoint: {NAME}")
        finally:
            driver.quit()
            stream.cancel()
