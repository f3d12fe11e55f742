"""The Kubernetes API test server (lookaside_dev/kube_api.py), driven by the official kubernetes client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from lookaside_dev.kube_api import KubeAPIServer, endpoint, endpoint_slice, endpoints, service

NS = "default"
SVC_LABEL = "kubernetes.io/service-name"


class WatchThread:
    """Runs ``Watch().stream(func, ...)`` in a thread and collects its events (dict events as they come)."""

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.watch = watch.Watch()
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(func, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        try:
            for ev in self.watch.stream(func, *args, **kwargs):
                with self._cond:
                    self.events.append(ev)
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.events), timeout)

    def wait_done(self, timeout: float = 5.0) -> bool:
        with self._cond:
            ok = self._cond.wait_for(lambda: self._done, timeout)
        self._thread.join(1.0)
        return ok

    def types(self) -> list[tuple[str, str | None]]:
        with self._cond:
            return [(e["type"], e["raw_object"].get("metadata", {}).get("name")) for e in self.events]

    def stop(self) -> None:
        # Watch.stop() interrupts a stream only once the response is in hand (it shuts its socket down);
        # called earlier it just sets a flag checked after the next event: repeat until the thread ends.
        deadline = time.monotonic() + 5.0
        while self._thread.is_alive() and time.monotonic() < deadline:
            self.watch.stop()
            self._thread.join(0.05)
        assert not self._thread.is_alive()


@pytest.fixture
def kube() -> Iterator[KubeAPIServer]:
    with KubeAPIServer(bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
def api(kube: KubeAPIServer) -> Iterator[client.ApiClient]:
    with client.ApiClient(client.Configuration(host=kube.url)) as api_client:
        yield api_client


@pytest.fixture
def watches() -> Iterator[list[WatchThread]]:
    started: list[WatchThread] = []
    yield started
    for w in started:
        w.stop()


def start_watch(
    watches: list[WatchThread], func: Callable[..., Any], *args: Any, **kwargs: Any
) -> WatchThread:
    w = WatchThread(func, *args, **kwargs)
    watches.append(w)
    return w


def test_list_with_label_selector_returns_the_services_slices(
    kube: KubeAPIServer, api: client.ApiClient
) -> None:
    kube.apply(
        endpoint_slice(
            "greet-a",
            "greet",
            endpoints=["127.0.0.1", endpoint("127.0.0.2", ready=False, zone="zone-a", for_zones=["zone-a"])],
        )
    )
    kube.apply(endpoint_slice("greet-b", "greet", endpoints=["127.0.0.3"], ports=[("grpc", 50052)]))
    kube.apply(endpoint_slice("other-a", "other", endpoints=["10.0.0.9"]))
    kube.apply(endpoint_slice("greet-x", "greet", namespace="prod", endpoints=["10.0.0.1"]))

    result = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
        NS, label_selector=f"{SVC_LABEL}=greet"
    )

    assert isinstance(result, client.V1EndpointSliceList)
    assert [s.metadata.name for s in result.items] == ["greet-a", "greet-b"]
    assert result.metadata.resource_version == str(kube.resource_version)
    a, b = result.items
    assert a.address_type == "IPv4"
    assert a.metadata.labels[SVC_LABEL] == "greet"
    assert a.metadata.resource_version and a.metadata.uid and a.metadata.creation_timestamp
    assert int(a.metadata.resource_version) < int(b.metadata.resource_version)
    assert [e.addresses for e in a.endpoints] == [["127.0.0.1"], ["127.0.0.2"]]
    assert a.endpoints[0].conditions.ready is True and a.endpoints[0].conditions.terminating is False
    assert a.endpoints[1].conditions.ready is False and a.endpoints[1].zone == "zone-a"
    assert a.endpoints[1].hints.for_zones[0].name == "zone-a"
    assert [(p.name, p.port, p.protocol) for p in b.ports] == [("grpc", 50052, "TCP")]
    assert kube.request_count("list", "endpointslices") == 1


def test_selectors_and_cluster_wide_list(kube: KubeAPIServer, api: client.ApiClient) -> None:
    discovery = client.DiscoveryV1Api(api)
    kube.apply(endpoint_slice("a-1", "a", labels={"tier": "x"}))
    kube.apply(endpoint_slice("b-1", "b", labels={"tier": "y"}))
    kube.apply(endpoint_slice("c-1", "c", namespace="other"))

    def names(**kw: Any) -> list[str]:
        return [s.metadata.name for s in discovery.list_namespaced_endpoint_slice(NS, **kw).items]

    assert names(label_selector=f"{SVC_LABEL}!=a") == ["b-1"]
    assert names(label_selector="tier") == ["a-1", "b-1"]
    assert names(label_selector="!tier") == []
    assert names(label_selector=f"tier in (x,z),{SVC_LABEL}=a") == ["a-1"]
    assert names(label_selector="tier notin (x)") == ["b-1"]
    assert names(field_selector="metadata.name=b-1") == ["b-1"]
    everywhere = discovery.list_endpoint_slice_for_all_namespaces()
    assert [(s.metadata.namespace, s.metadata.name) for s in everywhere.items] == [
        ("default", "a-1"),
        ("default", "b-1"),
        ("other", "c-1"),
    ]
    with pytest.raises(ApiException) as info:
        discovery.list_namespaced_endpoint_slice(NS, field_selector="spec.nodeName=x")
    assert info.value.status == 400


def test_watch_replays_from_resource_version_then_streams_live(
    kube: KubeAPIServer, api: client.ApiClient, watches: list[WatchThread]
) -> None:
    discovery = client.DiscoveryV1Api(api)
    kube.apply(endpoint_slice("greet-a", "greet", endpoints=["127.0.0.1"]))
    listed = discovery.list_namespaced_endpoint_slice(NS, label_selector=f"{SVC_LABEL}=greet")
    kube.apply(endpoint_slice("greet-a", "greet", endpoints=["127.0.0.1", "127.0.0.2"]))  # after the list
    kube.apply(endpoint_slice("other-a", "other", endpoints=["10.0.0.1"]))  # filtered out

    w = start_watch(
        watches,
        discovery.list_namespaced_endpoint_slice,
        NS,
        label_selector=f"{SVC_LABEL}=greet",
        resource_version=listed.metadata.resource_version,
        allow_watch_bookmarks=True,
        timeout_seconds=10,
    )
    assert w.wait_for(lambda evs: len(evs) >= 1)
    assert w.types()[0] == ("MODIFIED", "greet-a")  # replayed
    assert [a for e in w.events[0]["object"].endpoints for a in e.addresses] == ["127.0.0.1", "127.0.0.2"]
    assert kube.wait_for_open_watches(1, resource="EndpointSlice")

    kube.apply(endpoint_slice("greet-b", "greet", endpoints=["127.0.0.3"]))
    kube.delete("EndpointSlice", NS, "greet-a")

    def live(evs: list[dict[str, Any]]) -> bool:
        return [(e["type"], e["raw_object"]["metadata"]["name"]) for e in evs if e["type"] != "BOOKMARK"] == [
            ("MODIFIED", "greet-a"),
            ("ADDED", "greet-b"),
            ("DELETED", "greet-a"),
        ]

    assert w.wait_for(live), w.types()
    deleted = [e for e in w.events if e["type"] == "DELETED"][0]
    assert isinstance(deleted["object"], client.V1EndpointSlice)
    assert deleted["object"].metadata.resource_version == str(kube.resource_version)
    w.stop()
    assert kube.wait_for_open_watches(0)


def test_watch_without_resource_version_starts_with_synthetic_added(
    kube: KubeAPIServer, api: client.ApiClient, watches: list[WatchThread]
) -> None:
    kube.apply(endpoint_slice("greet-a", "greet", endpoints=["127.0.0.1"]))
    kube.apply(endpoint_slice("greet-b", "greet", endpoints=["127.0.0.2"]))
    discovery = client.DiscoveryV1Api(api)
    w = start_watch(
        watches, discovery.list_namespaced_endpoint_slice, NS, resource_version="0", timeout_seconds=10
    )
    assert w.wait_for(lambda evs: len(evs) == 2)
    assert w.types() == [("ADDED", "greet-a"), ("ADDED", "greet-b")]
    kube.apply(endpoint_slice("greet-c", "greet", endpoints=["127.0.0.3"]))
    assert w.wait_for(lambda evs: len(evs) == 3)
    assert w.types()[-1] == ("ADDED", "greet-c")


def test_selector_semantics_and_no_event_for_unchanged_apply(
    kube: KubeAPIServer, api: client.ApiClient, watches: list[WatchThread]
) -> None:
    kube.apply(endpoint_slice("s-1", "greet", endpoints=["127.0.0.1"]))
    rv = kube.resource_version
    again = kube.apply(endpoint_slice("s-1", "greet", endpoints=["127.0.0.1"]))  # nothing changed
    assert kube.resource_version == rv and again["metadata"]["resourceVersion"] == str(rv)

    w = start_watch(
        watches,
        client.DiscoveryV1Api(api).list_namespaced_endpoint_slice,
        NS,
        label_selector=f"{SVC_LABEL}=greet",
        resource_version=str(rv),
        timeout_seconds=10,
    )
    assert kube.wait_for_open_watches(1)
    kube.apply(endpoint_slice("s-1", "moved", endpoints=["127.0.0.1"]))  # leaves the selector
    kube.apply(endpoint_slice("s-1", "greet", endpoints=["127.0.0.1"]))  # comes back
    assert w.wait_for(lambda evs: len(evs) == 2)
    assert w.types() == [("DELETED", "s-1"), ("ADDED", "s-1")]


def test_bookmarks_arrive_as_dicts_periodically_and_on_demand(
    kube: KubeAPIServer, api: client.ApiClient, watches: list[WatchThread]
) -> None:
    kube.bookmark_interval = 30.0  # only on demand first
    rv = str(kube.resource_version)
    discovery = client.DiscoveryV1Api(api)
    w = start_watch(
        watches,
        discovery.list_namespaced_endpoint_slice,
        NS,
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=10,
    )
    assert kube.wait_for_open_watches(1)
    kube.apply(endpoint_slice("s-1", "greet"))
    assert w.wait_for(lambda evs: len(evs) == 1)
    assert kube.bookmark() == 1
    assert w.wait_for(lambda evs: len(evs) == 2)
    bm = w.events[1]
    assert bm["type"] == "BOOKMARK" and isinstance(bm["object"], dict)
    assert bm["object"]["metadata"]["resourceVersion"] == str(kube.resource_version)
    assert bm["object"]["kind"] == "EndpointSlice"

    kube.bookmark_interval = 0.05  # periodic, for watches started from now on
    w2 = start_watch(
        watches,
        discovery.list_namespaced_endpoint_slice,
        NS,
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=10,
    )
    assert w2.wait_for(lambda evs: sum(e["type"] == "BOOKMARK" for e in evs) >= 3)
    # A watch that did not ask for bookmarks gets none.
    w3 = start_watch(
        watches, discovery.list_namespaced_endpoint_slice, NS, resource_version=rv, timeout_seconds=10
    )
    assert w3.wait_for(lambda evs: len(evs) == 1)
    assert kube.bookmark() == 2  # only w and w2 allowed them
    assert w.wait_for(lambda evs: len(evs) == 3)
    assert w3.types() == [("ADDED", "s-1")]


def test_send_initial_events_ends_with_annotated_bookmark(
    kube: KubeAPIServer, api: client.ApiClient, watches: list[WatchThread]
) -> None:
    kube.apply(endpoint_slice("s-1", "greet"))
    w = start_watch(
        watches,
        client.DiscoveryV1Api(api).list_namespaced_endpoint_slice,
        NS,
        allow_watch_bookmarks=True,
        send_initial_events=True,
        resource_version_match="NotOlderThan",
        timeout_seconds=10,
    )
    assert w.wait_for(lambda evs: len(evs) >= 2)
    assert w.events[0]["type"] == "ADDED"
    assert w.events[1]["type"] == "BOOKMARK"
    assert w.events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_compacted_resource_version_is_410(kube: KubeAPIServer, api: client.ApiClient) -> None:
    discovery = client.DiscoveryV1Api(api)
    old = str(kube.resource_version)
    kube.apply(endpoint_slice("s-1", "greet"))
    kube.compact()
    with pytest.raises(ApiException) as info:
        for _ in watch.Watch().stream(discovery.list_namespaced_endpoint_slice, NS, resource_version=old):
            pytest.fail("no event expected")
    assert info.value.status == 410
    assert "too old resource version" in info.value.body
    # From the compaction point on, watching works.
    events = list(
        watch.Watch().stream(
            discovery.list_namespaced_endpoint_slice,
            NS,
            resource_version=str(kube.compacted_resource_version),
            timeout_seconds=1,
        )
    )
    assert events == []


def test_in_stream_410_is_retried_once_then_raised(
    kube: KubeAPIServer, api: client.ApiClient, watches: list[WatchThread]
) -> None:
    discovery = client.DiscoveryV1Api(api)
    start = str(kube.resource_version)
    w = start_watch(
        watches, discovery.list_namespaced_endpoint_slice, NS, resource_version=start
    )  # no timeout
    assert kube.wait_for_open_watches(1)
    kube.apply(endpoint_slice("s-1", "greet"))
    assert w.wait_for(lambda evs: len(evs) == 1)

    # Not compacted: the client resumes from its last resourceVersion and keeps streaming.
    assert kube.inject_watch_error(410) == 1
    assert kube.wait_for_requests(2, "watch")
    assert kube.wait_for_open_watches(1)
    kube.apply(endpoint_slice("s-2", "greet"))
    assert w.wait_for(lambda evs: len(evs) == 2)
    assert w.error is None

    # Compacted past its resourceVersion: the retry gets 410 too and the client raises.
    kube.apply(service("unrelated"))  # moves the global resourceVersion past the watch's last event
    kube.compact()
    kube.inject_watch_error(410)
    assert w.wait_done()
    assert isinstance(w.error, ApiException) and w.error.status == 410
    assert kube.request_count("watch") == 3
    assert kube.wait_for_open_watches(0)


def test_expired_watch_as_error_event_mode(api: client.ApiClient) -> None:
    with KubeAPIServer(expired_watch="event") as kube:
        old = str(kube.resource_version)
        kube.apply(endpoint_slice("s-1", "greet"))
        kube.compact()
        with client.ApiClient(client.Configuration(host=kube.url)) as api2:
            discovery = client.DiscoveryV1Api(api2)
            with pytest.raises(ApiException) as info:
                for _ in watch.Watch().stream(
                    discovery.list_namespaced_endpoint_slice, NS, resource_version=old
                ):
                    pytest.fail("no event expected")
        assert info.value.status == 410
        assert kube.request_count("watch") == 2  # the client retried once
        assert kube.wait_for_open_watches(0)


def test_fail_next_answers_with_status(kube: KubeAPIServer, api: client.ApiClient) -> None:
    discovery = client.DiscoveryV1Api(api)
    core = client.CoreV1Api(api)
    kube.fail_next(2, status=500)
    for _ in range(2):
        with pytest.raises(ApiException) as info:
            discovery.list_namespaced_endpoint_slice(NS)
        assert info.value.status == 500
        assert '"kind":"Status"' in info.value.body
    assert discovery.list_namespaced_endpoint_slice(NS).items == []

    kube.fail_next(1, status=503, path="/services")
    assert discovery.list_namespaced_endpoint_slice(NS).items == []  # not matched, fault kept
    with pytest.raises(ApiException) as info:
        core.list_namespaced_service(NS)
    assert info.value.status == 503
    core.list_namespaced_service(NS)

    kube.fail_next(1, status=500, verb="watch")
    discovery.list_namespaced_endpoint_slice(NS)
    with pytest.raises(ApiException) as info:
        list(watch.Watch().stream(discovery.list_namespaced_endpoint_slice, NS, timeout_seconds=1))
    assert info.value.status == 500


def test_stop_and_start_on_the_same_port(
    kube: KubeAPIServer, api: client.ApiClient, watches: list[WatchThread]
) -> None:
    discovery = client.DiscoveryV1Api(api)
    kube.apply(endpoint_slice("s-1", "greet"))
    port = kube.port
    w = start_watch(
        watches, discovery.list_namespaced_endpoint_slice, NS, resource_version="0", timeout_seconds=30
    )
    assert w.wait_for(lambda evs: len(evs) == 1)

    kube.stop()
    assert w.wait_done()  # the stream ended cleanly; with timeout_seconds the client does not re-watch
    assert w.error is None
    assert kube.open_watch_count() == 0
    down = client.Configuration(host=kube.url)
    down.retries = False
    with client.ApiClient(down) as api_down, pytest.raises(urllib3.exceptions.HTTPError):
        client.DiscoveryV1Api(api_down).list_namespaced_endpoint_slice(NS)
    kube.apply(endpoint_slice("s-2", "greet"))  # state changes while "down"

    kube.start()
    assert kube.port == port
    result = discovery.list_namespaced_endpoint_slice(NS)
    assert [s.metadata.name for s in result.items] == ["s-1", "s-2"]
    assert result.metadata.resource_version == str(kube.resource_version)

    # An abrupt stop cuts open streams: the client sees a broken connection.
    w2 = start_watch(
        watches, discovery.list_namespaced_endpoint_slice, NS, resource_version="0", timeout_seconds=30
    )
    assert w2.wait_for(lambda evs: len(evs) == 2)
    kube.stop(abrupt=True)
    assert w2.wait_done()
    assert w2.error is not None
    kube.start()
    assert kube.port == port


def test_read_namespaced_service_and_endpoints(kube: KubeAPIServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    with pytest.raises(ApiException) as info:
        core.read_namespaced_service("missing", NS)
    assert info.value.status == 404
    assert "NotFound" in info.value.body

    kube.apply(service("greet", ports=[("grpc", 50051)]))
    svc = core.read_namespaced_service("greet", NS)
    assert isinstance(svc, client.V1Service)
    assert [(p.name, p.port) for p in svc.spec.ports] == [("grpc", 50051)]
    assert svc.metadata.resource_version == str(kube.resource_version)
    assert [
        s.metadata.name for s in core.list_namespaced_service(NS, field_selector="metadata.name=greet").items
    ] == ["greet"]

    kube.apply(endpoints("greet", addresses=["127.0.0.1"], not_ready=["127.0.0.2"], ports=[("grpc", 50051)]))
    ep = core.read_namespaced_endpoints("greet", NS)
    assert [a.ip for a in ep.subsets[0].addresses] == ["127.0.0.1"]
    assert [a.ip for a in ep.subsets[0].not_ready_addresses] == ["127.0.0.2"]
    assert kube.get("Endpoints", NS, "greet")["metadata"]["resourceVersion"] == ep.metadata.resource_version
    with pytest.raises(ApiException) as info:
        core.read_namespaced_endpoints("missing", NS)
    assert info.value.status == 404


def test_endpoints_and_services_watch(
    kube: KubeAPIServer, api: client.ApiClient, watches: list[WatchThread]
) -> None:
    core = client.CoreV1Api(api)
    rv = str(kube.resource_version)
    we = start_watch(watches, core.list_namespaced_endpoints, NS, resource_version=rv, timeout_seconds=10)
    ws = start_watch(watches, core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=10)
    assert kube.wait_for_open_watches(1, resource="endpoints") and kube.wait_for_open_watches(
        1, resource="svc"
    )
    kube.apply(endpoints("greet", addresses=["127.0.0.1"]))
    kube.apply(service("greet", namespace="prod"))
    kube.apply(endpoints("greet", addresses=["127.0.0.1", "127.0.0.2"]))
    assert we.wait_for(lambda evs: len(evs) == 2)
    assert [t for t, _ in we.types()] == ["ADDED", "MODIFIED"]
    assert isinstance(we.events[1]["object"], client.V1Endpoints)
    assert len(we.events[1]["object"].subsets[0].addresses) == 2
    assert ws.wait_for(lambda evs: len(evs) == 1)
    assert ws.events[0]["object"].metadata.namespace == "prod"


def test_timeout_seconds_closes_the_stream(kube: KubeAPIServer, api: client.ApiClient) -> None:
    started = time.monotonic()
    events = list(
        watch.Watch().stream(
            client.DiscoveryV1Api(api).list_namespaced_endpoint_slice,
            NS,
            resource_version=str(kube.resource_version),
            timeout_seconds=1,
        )
    )
    elapsed = time.monotonic() - started
    assert events == []
    assert 0.9 <= elapsed < 3.0
    assert kube.wait_for_open_watches(0)


def test_open_watch_count_follows_clients_that_leave(
    kube: KubeAPIServer, api: client.ApiClient, watches: list[WatchThread]
) -> None:
    discovery = client.DiscoveryV1Api(api)
    rv = str(kube.resource_version)
    a = start_watch(watches, discovery.list_namespaced_endpoint_slice, NS, resource_version=rv)
    b = start_watch(watches, discovery.list_namespaced_endpoint_slice, "prod", resource_version=rv)
    assert kube.wait_for_open_watches(2)
    assert kube.open_watch_count(namespace="prod") == 1
    assert kube.request_count("watch", "EndpointSlice") == 2
    a.stop()  # idle stream: the server notices the closed connection without writing to it
    assert kube.wait_for_open_watches(1)
    assert kube.open_watch_count(namespace="default") == 0
    b.stop()
    assert kube.wait_for_open_watches(0)
    assert kube.close_watches() == 0


def test_close_watches_makes_the_client_rewatch(
    kube: KubeAPIServer, api: client.ApiClient, watches: list[WatchThread]
) -> None:
    kube.apply(endpoint_slice("s-1", "greet"))
    w = start_watch(
        watches, client.DiscoveryV1Api(api).list_namespaced_endpoint_slice, NS, resource_version="0"
    )
    assert w.wait_for(lambda evs: len(evs) == 1)
    assert kube.close_watches("EndpointSlice") == 1
    assert kube.wait_for_requests(2, "watch")
    last = kube.requests[-1]
    assert (
        last.verb == "watch"
        and last.query["resourceVersion"] == w.events[0]["object"].metadata.resource_version
    )
    kube.apply(endpoint_slice("s-2", "greet"))
    assert w.wait_for(lambda evs: len(evs) == 2)
    assert w.types() == [("ADDED", "s-1"), ("ADDED", "s-2")]  # no duplicate after the re-watch


def test_set_delay_slows_responses(kube: KubeAPIServer, api: client.ApiClient) -> None:
    discovery = client.DiscoveryV1Api(api)
    kube.set_delay(0.3)
    started = time.monotonic()
    discovery.list_namespaced_endpoint_slice(NS)
    assert time.monotonic() - started >= 0.3
    kube.set_delay(0)
    started = time.monotonic()
    discovery.list_namespaced_endpoint_slice(NS)
    assert time.monotonic() - started < 0.3


def test_apply_validates_and_builders(kube: KubeAPIServer) -> None:
    bad = endpoint_slice("s-1", "greet")
    del bad["addressType"]
    with pytest.raises(ValueError):
        kube.apply(bad)
    stored = kube.apply(
        endpoint_slice(
            "s-1", "greet", endpoints=[endpoint("127.0.0.1", terminating=True, ready=False, serving=True)]
        )
    )
    assert stored["endpoints"][0]["conditions"] == {"ready": False, "serving": True, "terminating": True}
    assert stored["metadata"]["labels"][SVC_LABEL] == "greet"
    uid = stored["metadata"]["uid"]
    changed = kube.apply(endpoint_slice("s-1", "greet", endpoints=["127.0.0.1"]))
    assert changed["metadata"]["uid"] == uid
    assert int(changed["metadata"]["resourceVersion"]) > int(stored["metadata"]["resourceVersion"])
    assert kube.delete("EndpointSlice", NS, "s-1") is not None
    assert kube.delete("EndpointSlice", NS, "s-1") is None
    assert kube.get("EndpointSlice", NS, "s-1") is None
