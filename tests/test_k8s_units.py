"""Kubernetes source pieces without a server: object conversion, flags, configuration; and the CLI end to end
against the test API server (in-pod style environment, SIGTERM with live watches exits 0)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from lookaside_dev.kube_api import KubeAPIServer, endpoint, endpoint_slice, endpoints, service
from lookaside_grpc import protocol as pb
from lookaside_server import BackendEndpoint
from lookaside_server.__main__ import build_parser
from lookaside_server._cli.source_flags import choose_source
from lookaside_server._sources.kube_config import own_namespace, parse_allow_namespaces
from lookaside_server._sources.kube_objects import (
    ServicePort,
    endpoints_member,
    endpoints_object_endpoints,
    merge,
    merge_endpoints_objects,
    merge_members,
    merge_slices,
    normalize_ip,
    object_key,
    service_info,
    slice_endpoints,
    slice_member,
)
from lookaside_server._sources.kubernetes import KubernetesSource


def test_slice_conversion_defaults_ports_and_hints() -> None:
    obj = endpoint_slice(
        "s",
        "greet",
        endpoints=[
            endpoint(
                "10.0.0.1", ready=None, serving=None, terminating=None, zone="z1", for_zones=["z1", "z2"]
            ),
            endpoint("10.0.0.2", ready=False, serving=True, terminating=True),
            {"addresses": [], "conditions": {}},  # no address: skipped
            {"addresses": ["not-an-ip"]},
        ],
        ports=[
            ("grpc", 50051),
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "all", "port": None},
            {"port": 9000},
        ],
    )
    got = slice_endpoints(obj)
    assert got == [
        BackendEndpoint("10.0.0.1", 50051, "grpc", "z1", ("z1", "z2"), True, True, False),
        BackendEndpoint("10.0.0.1", 9000, "", "z1", ("z1", "z2"), True, True, False),
        BackendEndpoint("10.0.0.2", 50051, "grpc", "", (), False, True, True),
        BackendEndpoint("10.0.0.2", 9000, "", "", (), False, True, True),
    ]
    assert slice_endpoints({**obj, "addressType": "FQDN"}) == []
    assert slice_endpoints({"addressType": "IPv4", "endpoints": None, "ports": None}) == []


def test_ip_normalisation() -> None:
    assert normalize_ip("FD00:0:0::0001") == "fd00::1"
    assert normalize_ip("[fd00::1]") == "fd00::1"
    assert normalize_ip("10.0.0.1") == "10.0.0.1"
    assert normalize_ip("example.com") is None and normalize_ip(None) is None


def test_merge_dedupes_with_best_conditions_and_sorts_by_service_port_order() -> None:
    stale = endpoint_slice(
        "a", "greet", endpoints=[endpoint("10.0.0.2", ready=False)], ports=[("http", 8080), ("grpc", 50051)]
    )
    fresh = endpoint_slice(
        "b", "greet", endpoints=["10.0.0.2", "10.0.0.10", "10.0.0.9"], ports=[("http", 8080), ("grpc", 50051)]
    )
    merged = merge_slices({"b": fresh, "a": stale}, ["grpc", "http"])
    assert [(e.port_name, e.ip) for e in merged] == [
        ("grpc", "10.0.0.2"),
        ("grpc", "10.0.0.9"),
        ("grpc", "10.0.0.10"),
        ("http", "10.0.0.2"),
        ("http", "10.0.0.9"),
        ("http", "10.0.0.10"),
    ]
    assert all(e.ready for e in merged)  # the duplicate keeps its best conditions
    # the order of the input never matters (equal states compare equal)
    assert merge_slices({"a": stale, "b": fresh}, ["grpc", "http"]) == merged
    # ports the Service does not list come after, in order of appearance
    assert [e.port_name for e in merge(list(reversed(merged)), ["http"])][:3] == ["http"] * 3
    assert merge([], ["grpc"]) == ()


def test_endpoints_object_conversion() -> None:
    obj = endpoints(
        "greet",
        subsets=[
            {
                "addresses": [{"ip": "10.0.0.1"}, {"ip": "fd00::0002"}],
                "notReadyAddresses": [{"ip": "10.0.0.9"}],
                "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
            },
            {"notReadyAddresses": [{"ip": "10.0.0.8"}], "ports": [{"name": "grpc", "port": 50051}]},
        ],
    )
    assert [(e.ip, e.port, e.ready) for e in endpoints_object_endpoints(obj)] == [
        ("10.0.0.1", 50051, True),
        ("fd00::2", 50051, True),
    ]
    assert merge_endpoints_objects({"greet": obj}) == tuple(endpoints_object_endpoints(obj))
    assert endpoints_object_endpoints({"subsets": None}) == []


def test_compact_forms_kept_by_the_namespace_watch() -> None:
    svc = service(
        "greet", namespace="shop", ports=[("grpc", 80), {"name": "http", "port": 8080, "targetPort": "web"}]
    )
    assert object_key(svc) == ("shop", "greet") and object_key({"metadata": {}}) is None
    info = service_info(svc)
    assert info.ports == (ServicePort("grpc", 80, 80), ServicePort("http", 8080, "web"))
    assert info.port_names == ("grpc", "http")
    assert service_info({"spec": {"ports": [{"port": "x"}]}}).ports == ()
    a = endpoint_slice(
        "greet-a",
        "greet",
        endpoints=["10.0.0.2", endpoint("10.0.0.1", ready=False)],
        ports=[("http", 8080), ("grpc", 50051)],
    )
    b = endpoint_slice("greet-b", "greet", endpoints=["10.0.0.1"], ports=[("http", 8080), ("grpc", 50051)])
    member_a, member_b = slice_member(a), slice_member(b)
    assert member_a is not None and member_b is not None
    assert member_a == ("greet", tuple(slice_endpoints(a)))
    # merged from the compact forms: the same state as from the raw slices
    assert merge_members({"greet-b": member_b[1], "greet-a": member_a[1]}, info.port_names) == merge_slices(
        {"greet-a": a, "greet-b": b}, info.port_names
    )
    unlabelled = endpoint_slice("x", "greet")
    del unlabelled["metadata"]["labels"]["kubernetes.io/service-name"]
    assert slice_member(unlabelled) is None  # not managed for a Service
    eps = endpoints("greet", addresses=["10.0.0.1"])
    assert endpoints_member(eps) == ("greet", tuple(endpoints_object_endpoints(eps)))


def test_allow_namespace_parsing() -> None:
    assert parse_allow_namespaces(None) is None
    assert parse_allow_namespaces(["a,b", " c "]) == frozenset({"a", "b", "c"})
    assert parse_allow_namespaces(["a", "*"]) is None
    with pytest.raises(ValueError):
        parse_allow_namespaces([" , "])


def test_own_namespace_from_pod_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "shop")
    assert own_namespace() == "shop"


def _kubeconfig(tmp_path: Path, url: str, namespace: str | None = None) -> Path:
    context: dict[str, Any] = {"cluster": "test", "user": "test"}
    if namespace:
        context["namespace"] = namespace
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "test", "cluster": {"server": url}}],
                "contexts": [{"name": "test", "context": context}],
                "users": [{"name": "test", "user": {}}],
            }
        )
    )
    return path


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_flags_choose_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "LB_SOURCE",
        "LB_ALLOW_NAMESPACES",
        "POD_NAMESPACE",
        "KUBERNETES_SERVICE_HOST",
        "LB_STATIC_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    static = choose_source(_args("--static-file", "x.yaml"))
    assert (static.kind, static.source, static.allow_namespaces) == ("static", None, None)
    assert choose_source(
        _args("--static-file", "x.yaml", "--allow-namespace", "a,b")
    ).allow_namespaces == frozenset({"a", "b"})
    with pytest.raises(ValueError):
        choose_source(_args("--source", "static"))
    kubeconfig = _kubeconfig(tmp_path, "http://127.0.0.1:1", namespace="team-a")
    chosen = choose_source(
        _args(
            "--kubeconfig",
            str(kubeconfig),
            "--resync-interval",
            "7",
            "--watch-timeout",
            "30",
            "--idle-timeout",
            "0",
            "--max-targets",
            "5",
        )
    )
    assert chosen.kind == "endpointslices" and isinstance(chosen.source, KubernetesSource)
    assert chosen.allow_namespaces == frozenset({"team-a"})  # the server's own namespace by default
    src = chosen.source
    assert (src.timings.resync_interval, src.timings.watch_timeout, src.idle_timeout, src.max_targets) == (
        7.0,
        30.0,
        None,
        5,
    )
    assert src.api_client.configuration.host == "http://127.0.0.1:1"
    assert not src.cluster_wide  # one namespace: watched per namespace
    monkeypatch.setenv("LB_ALLOW_NAMESPACES", "*")
    monkeypatch.setenv("LB_SOURCE", "endpoints")
    chosen = choose_source(_args("--kubeconfig", str(kubeconfig)))
    everywhere = chosen.source
    assert isinstance(everywhere, KubernetesSource)
    assert (chosen.kind, chosen.allow_namespaces, everywhere.kind) == (
        "endpoints",
        None,
        "kubernetes endpoints",
    )
    assert everywhere.idle_timeout == 600.0
    assert everywhere.cluster_wide  # every namespace: one cluster-wide watch


def test_cli_on_kubernetes_serves_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    with KubeAPIServer(bookmark_interval=0.2) as kube:
        kube.apply(service("greet"))
        kube.apply(endpoint_slice("greet-a", "greet", endpoints=["10.0.0.1"]))
        kube.apply(service("greet", namespace="prod"))
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("LB_") and k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")
        }
        env.update(
            POD_NAMESPACE="default",
            KUBECONFIG=str(_kubeconfig(tmp_path, kube.url)),
            LB_LOG_LEVEL="INFO",
            LB_HTTP_PORT="-1",
        )
        argv = [
            sys.executable,
            "-m",
            "lookaside_server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--watch-timeout",
            "5",
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines: list[str] = []
        found: list[int] = []
        ready = threading.Event()

        def scan() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                    found.append(int(m.group(1)))
                    ready.set()

        reader = threading.Thread(target=scan, daemon=True)
        reader.start()
        try:
            assert ready.wait(20), "".join(lines)
            with grpc.insecure_channel(f"127.0.0.1:{found[0]}") as ch:
                stub = pb.LookasideStub(ch)
                stream = stub.Watch(pb.WatchRequest(service="greet", namespace="default"), timeout=20)
                assert [e.ip for e in next(stream).endpoints] == ["10.0.0.1"]
                kube.apply(endpoint_slice("greet-a", "greet", endpoints=["10.0.0.2"]))
                assert [e.ip for e in next(stream).endpoints] == ["10.0.0.2"]
                with pytest.raises(grpc.RpcError) as err:
                    stub.Resolve(pb.Request(service="greet", namespace="prod"), timeout=10)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                # namespace default: one watch of Services, one of EndpointSlices
                assert kube.wait_for_open_watches(2)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=15) == 0, "".join(lines)
                stream.cancel()
            assert kube.wait_for_open_watches(0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            reader.join(5)
