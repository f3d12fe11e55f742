"""Static consistency checks of the Kubernetes manifests (server/k8s) and the server Dockerfile.

No cluster needed: the kustomizations are followed by hand (resources, components, ``$patch: delete`` and
strategic-merge patches with list items merged by ``name`` and ``null`` deleting a field), which is all these
layouts use. When ``kubectl`` is on PATH, ``kubectl kustomize`` renders every build too and must agree.
"""

from __future__ import annotations

import copy
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = ROOT / "server" / "k8s"
DOCKERFILE = ROOT / "server" / "Dockerfile"
BUILDS = ["base", "cluster-wide", "greet-example", "tls"]
COMPONENTS = sorted(p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml"))
#: Overlays a component is tried on (rendered with the component added to its ``components``).
COMPONENT_HOSTS = ["base", "cluster-wide", "greet-example"]
GRPC_PORT, HTTP_PORT = 50055, 8080
TLS_SECRET = "lookaside-tls"
IMAGE = "lookaside-grpc:latest"
READ_VERBS = {"get", "list", "watch"}
KUSTOMIZATION = "kustomization.yaml"
README = ROOT / "README.md"
#: README "Sizing": a Watch/xDS stream costs 12-24 kB; the server at rest well under 100 MB.
STREAM_KB, REST_MB = 24, 100

Obj = dict[str, Any]


def load_docs(path: pathlib.Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def yaml_files() -> list[pathlib.Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def kustomizations() -> list[pathlib.Path]:
    return sorted(K8S.rglob(KUSTOMIZATION))


def build(
    directory: pathlib.Path, extra_components: Iterable[pathlib.Path] = ()
) -> tuple[list[Obj], str | None]:
    """The objects a kustomization renders and its namespace: its resources, then its components (their
    resources, then their patches), then its own patches, as kustomize orders them. ``extra_components`` are
    added after the kustomization's own components."""
    k = load_docs(directory / KUSTOMIZATION)[0]
    objs: list[Obj] = []
    namespace = k.get("namespace")
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            sub, sub_ns = build(target)
            namespace = namespace or sub_ns
            objs.extend(sub)
        else:
            objs.extend(load_docs(target))
    components = [(directory / c).resolve() for c in k.get("components", [])] + list(extra_components)
    for comp in components:
        ck = load_docs(comp / KUSTOMIZATION)[0]
        assert ck["kind"] == "Component", f"{comp} is not a Component"
        for entry in ck.get("resources", []):
            objs.extend(load_docs(comp / entry))
        objs = apply_patches(comp, ck, objs)
    return apply_patches(directory, k, objs), namespace


def apply_patches(directory: pathlib.Path, k: Obj, objs: list[Obj]) -> list[Obj]:
    """``k``'s patches applied to ``objs``; every patch must match exactly one object."""
    for patch in k.get("patches", []):
        doc = yaml.safe_load(patch["patch"]) if "patch" in patch else load_docs(directory / patch["path"])[0]
        key = (doc["kind"], doc["metadata"]["name"])
        matching = [i for i, o in enumerate(objs) if (o["kind"], o["metadata"]["name"]) == key]
        assert len(matching) == 1, f"{directory}: patch of {key} matches {len(matching)} objects"
        if doc.get("$patch") == "delete":
            del objs[matching[0]]
        else:
            objs[matching[0]] = merge(objs[matching[0]], doc)
    return objs


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch as these manifests use it: maps merge, ``null`` deletes, lists of named maps
    (containers, env, ports, volumes, volumeMounts) merge by ``name``, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and patch
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out = copy.deepcopy(base)
        for item in patch:
            same = [i for i, x in enumerate(out) if x["name"] == item["name"]]
            if same:
                out[same[0]] = merge(out[same[0]], item)
            else:
                out.insert(0, copy.deepcopy(item))  # kustomize puts new list items first
        return out
    return copy.deepcopy(patch)


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_labels(deploy: Obj) -> dict[str, str]:
    return deploy["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def containers(deploy: Obj) -> Iterator[Obj]:
    spec = deploy["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def port_matches(port: int | str, container: Obj) -> bool:
    return any(port in (p["containerPort"], p.get("name")) for p in container.get("ports", []))


def container_port(container: Obj, port: int | str) -> Obj:
    (found,) = [p for p in container.get("ports", []) if port in (p["containerPort"], p.get("name"))]
    return found


def lookaside_container(objs: list[Obj]) -> Obj:
    (c,) = named(objs, "Deployment", "lookaside")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(container: Obj) -> dict[str, Obj]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"{container['name']}: duplicate env {names}"
    return {e["name"]: e for e in container.get("env", [])}


def server_env_names() -> set[str]:
    """Every LB_* variable the server's flags fall back to (from ``--help``), plus POD_NAMESPACE."""
    from lookaside_server.__main__ import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "500"  # argparse wraps by terminal width; keep names whole
    try:
        text = build_parser().format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    names = set(re.findall(r"\bLB_[A-Z0-9_]+\b", text))
    assert {"LB_PORT", "LB_HTTP_PORT", "LB_SOURCE", "LB_TLS_CERT", "LB_TLS_KEY", "LB_TLS_CLIENT_CA"} <= names
    # Not a flag: the namespace the server serves by default (see _sources/kube_config.own_namespace).
    kube_config = (ROOT / "server" / "lookaside_server" / "_sources" / "kube_config.py").read_text()
    assert 'os.environ.get("POD_NAMESPACE"' in kube_config
    return names | {"POD_NAMESPACE"}


def component_builds() -> list[tuple[str, str]]:
    return [(host, comp) for host in COMPONENT_HOSTS for comp in COMPONENTS]


@pytest.fixture(params=BUILDS + [f"{h}+{c}" for h, c in component_builds()])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Obj], str | None]:
    host, _, comp = request.param.partition("+")
    objs, namespace = build(K8S / host, [K8S / "components" / comp] if comp else [])
    return request.param, objs, namespace


def test_every_yaml_parses_and_names_its_objects() -> None:
    files = yaml_files()
    assert files
    for path in files:
        for doc in load_docs(path):
            assert isinstance(doc, dict), path
            assert doc.get("apiVersion") and doc.get("kind"), path
            if path.name != KUSTOMIZATION:
                assert doc["metadata"]["name"], path
                assert "namespace" not in doc["metadata"], f"{path}: namespaces come from the kustomization"


def test_kustomization_references_exist_and_no_file_is_orphaned() -> None:
    referenced: set[pathlib.Path] = set()
    for kpath in kustomizations():
        k = load_docs(kpath)[0]
        assert k["kind"] in ("Kustomization", "Component"), kpath
        for entry in list(k.get("resources", [])) + list(k.get("components", [])):
            target = (kpath.parent / entry).resolve()
            assert target.exists(), f"{kpath}: missing {entry}"
            if target.is_dir():
                assert (target / KUSTOMIZATION).is_file(), f"{kpath}: {entry} has no {KUSTOMIZATION}"
            else:
                referenced.add(target)
        for patch in k.get("patches", []):
            if "path" in patch:
                assert (kpath.parent / patch["path"]).is_file(), f"{kpath}: missing patch {patch['path']}"
                referenced.add((kpath.parent / patch["path"]).resolve())
    for path in yaml_files():
        if path.name != KUSTOMIZATION:
            assert path.resolve() in referenced, f"{path} is in no kustomization"
    # The optional components are valid on their own, even if no build includes them by default.
    assert set(COMPONENTS) >= {"endpoints-fallback", "tls"}
    for name in COMPONENTS:
        comp = load_docs(K8S / "components" / name / KUSTOMIZATION)[0]
        assert comp["kind"] == "Component"
        assert comp["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    # No key material in the repository: Secrets are created by the user (or cert-manager).
    assert not [d for p in yaml_files() for d in load_docs(p) if d["kind"] == "Secret"]


def test_deployments_select_their_own_pods(rendered: tuple[str, list[Obj], str | None]) -> None:
    name, objs, _ = rendered
    deploys = of_kind(objs, "Deployment")
    assert deploys, name
    for d in deploys:
        assert selects(d["spec"]["selector"]["matchLabels"], pod_labels(d)), d["metadata"]["name"]
    # No two Deployments claim the same pods.
    for a in deploys:
        for b in deploys:
            if a is not b:
                assert not selects(a["spec"]["selector"]["matchLabels"], pod_labels(b))


def test_services_select_a_deployment_and_target_its_ports(
    rendered: tuple[str, list[Obj], str | None],
) -> None:
    _, objs, _ = rendered
    services = of_kind(objs, "Service")
    assert services
    for svc in services:
        matching = [d for d in of_kind(objs, "Deployment") if selects(svc["spec"]["selector"], pod_labels(d))]
        assert len(matching) == 1, f"Service {svc['metadata']['name']} selects {len(matching)} Deployments"
        (deploy,) = matching
        for port in svc["spec"]["ports"]:
            where = (svc["metadata"]["name"], port["name"])
            target = port.get("targetPort", port["port"])
            owners = [c for c in containers(deploy) if port_matches(target, c)]
            assert len(owners) == 1, where
            # A Service port is named after what it speaks, as is the container port it targets:
            # grpc (cleartext h2c, or TLS without an appProtocol) or http.
            assert port["name"] in ("grpc", "http"), where
            assert container_port(owners[0], target).get("name") == port["name"], where
            assert port.get("protocol", "TCP") == "TCP", where
            wanted = {"grpc": {"kubernetes.io/h2c", None}, "http": {"http", None}}[port["name"]]
            assert port.get("appProtocol") in wanted, where


def test_service_accounts_and_bindings(rendered: tuple[str, list[Obj], str | None]) -> None:
    name, objs, namespace = rendered
    sas = {o["metadata"]["name"] for o in of_kind(objs, "ServiceAccount")}
    for d in of_kind(objs, "Deployment"):
        sa = d["spec"]["template"]["spec"].get("serviceAccountName")
        if sa is not None:
            assert sa in sas, f"{d['metadata']['name']}: ServiceAccount {sa} missing"
        elif d["spec"]["template"]["spec"].get("automountServiceAccountToken") is not False:
            pytest.fail(f"{d['metadata']['name']} mounts the default ServiceAccount token")
    bindings = of_kind(objs, "RoleBinding") + of_kind(objs, "ClusterRoleBinding")
    assert bindings, name
    for b in bindings:
        ref = b["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        assert ref["kind"] in ("Role", "ClusterRole")
        if b["kind"] == "ClusterRoleBinding":
            assert ref["kind"] == "ClusterRole"
        named(objs, ref["kind"], ref["name"])
        for subject in b["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert subject["name"] in sas
            assert subject["namespace"] == namespace, "the subject must be the namespace's ServiceAccount"
    # The server's account is bound to exactly one role that can read EndpointSlices.
    lookaside = named(objs, "Deployment", "lookaside")
    sa = lookaside["spec"]["template"]["spec"]["serviceAccountName"]
    bound = [b for b in bindings if any(s["name"] == sa for s in b["subjects"])]
    roles = [named(objs, b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bound]
    assert sum(_grants(r, "discovery.k8s.io", "endpointslices") for r in roles) == 1
    assert any(_grants(r, "", "services") for r in roles)
    host, _, component = name.partition("+")
    extra = ["Role"] if component == "endpoints-fallback" else []  # its own Role, for Endpoints only
    if host == "cluster-wide":
        assert [
            r
            for r in of_kind(objs, "Role") + of_kind(objs, "RoleBinding")
            if r["metadata"]["name"] == "lookaside"
        ] == []
        assert sorted(r["kind"] for r in roles) == sorted(["ClusterRole", *extra])
    else:
        assert sorted(r["kind"] for r in roles) == ["Role", *extra]


def _grants(role: Obj, group: str, resource: str) -> bool:
    return any(
        group in rule.get("apiGroups", [])
        and resource in rule.get("resources", [])
        and READ_VERBS <= set(rule.get("verbs", []))
        for rule in role.get("rules", [])
    )


def test_roles_are_read_only_and_narrow() -> None:
    roles = [
        doc for path in yaml_files() for doc in load_docs(path) if doc["kind"] in ("Role", "ClusterRole")
    ]
    assert {r["kind"] for r in roles} == {"Role", "ClusterRole"}
    allowed = {("discovery.k8s.io", "endpointslices"), ("", "services"), ("", "endpoints")}
    for role in roles:
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= READ_VERBS, role["metadata"]["name"]
            assert "*" not in rule["apiGroups"] and "*" not in rule["resources"]
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert (group, resource) in allowed, (role["metadata"]["name"], group, resource)
    base_role = named(build(K8S / "base")[0], "Role", "lookaside")
    assert _grants(base_role, "discovery.k8s.io", "endpointslices")
    assert not _grants(base_role, "", "endpoints"), "Endpoints access belongs to the optional component"


def test_lookaside_deployment(rendered: tuple[str, list[Obj], str | None]) -> None:
    name, objs, _ = rendered
    d = named(objs, "Deployment", "lookaside")
    assert d["spec"]["replicas"] == 2
    c = lookaside_container(objs)
    assert c["ports"] == [
        {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
    ]
    env = env_of(c)
    assert env["LB_PORT"]["value"] == str(GRPC_PORT)
    assert env["LB_HTTP_PORT"]["value"] == str(HTTP_PORT)
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Prometheus scrapes /metrics on the HTTP listener: by the pod annotations, or with the Prometheus
    # Operator by the ServiceMonitor (which ignores them; the component removes them against double scrapes).
    annotations = d["spec"]["template"]["metadata"].get("annotations") or {}
    if name.endswith("service-monitor"):
        assert not [a for a in annotations if a.startswith("prometheus.io/")]
        named(objs, "ServiceMonitor", "lookaside")
    else:
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(HTTP_PORT)
        assert annotations["prometheus.io/path"] == "/metrics"
    tls = "LB_TLS_CERT" in env
    assert tls == name.endswith("tls"), name
    # A startup probe covers a slow start (imports, first bind) before liveness may restart the pod.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30
    assert "initialDelaySeconds" not in c["livenessProbe"], "the startup probe replaces the delay"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        handlers = set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"}
        if tls:  # the kubelet's grpc probe cannot do TLS: /healthz on the plain-HTTP listener
            assert handlers == {"httpGet"}, (name, probe)
            assert c[probe]["httpGet"]["path"] == "/healthz"
            assert container_port(c, c[probe]["httpGet"]["port"])["containerPort"] == HTTP_PORT
        else:  # grpc.health.v1 on the gRPC port (grpc probes take numbers only)
            assert handlers == {"grpc"}, (name, probe)
            assert c[probe]["grpc"]["port"] == GRPC_PORT, probe
    assert c["resources"]["requests"] and c["resources"]["limits"]
    check_memory_sizing(c)
    svc = named(objs, "Service", "lookaside")
    ports = [(p["name"], p["port"]) for p in svc["spec"]["ports"]]
    assert ports == [("grpc", GRPC_PORT), ("http", HTTP_PORT)]
    grpc_port = svc["spec"]["ports"][0]
    assert grpc_port.get("appProtocol") == (None if tls else "kubernetes.io/h2c")


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity in MiB (the suffixes these manifests may use)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|k|M|G)?", str(quantity))
    assert m, quantity
    factor = {
        "Ki": 1 / 1024,
        "Mi": 1,
        "Gi": 1024,
        "k": 1e3 / 2**20,
        "M": 1e6 / 2**20,
        "G": 1e9 / 2**20,
        None: 1 / 2**20,
    }[m.group(2)]
    return float(m.group(1)) * factor


def check_memory_sizing(c: Obj) -> None:
    """The memory limit holds the streams --max-watches admits (README's per-stream cost, at its high end, on
    top of the server at rest), and the README's sizing names both figures."""
    env = env_of(c)
    max_watches = int(env["LB_MAX_WATCHES"]["value"])
    limit = mebibytes(c["resources"]["limits"]["memory"])
    request = mebibytes(c["resources"]["requests"]["memory"])
    needed = REST_MB + max_watches * STREAM_KB / 1024
    assert limit >= needed, f"{limit} MiB cannot hold {max_watches} streams (~{needed:.0f} MiB)"
    assert limit <= 2.5 * needed, "a limit far above what --max-watches admits wastes the node"
    assert request <= limit
    sizing = README.read_text().split("## Sizing", 1)[1].split("\n## ", 1)[0]
    assert c["resources"]["limits"]["memory"] in sizing and f"{max_watches:,}" in sizing


def test_env_vars_are_real_flags(rendered: tuple[str, list[Obj], str | None]) -> None:
    """Every variable set on the lookaside container is one the server reads, so a typo fails here."""
    name, objs, _ = rendered
    unknown = set(env_of(lookaside_container(objs))) - server_env_names()
    assert not unknown, f"{name}: the server reads no {sorted(unknown)}"


def test_every_lb_variable_named_in_the_manifests_exists() -> None:
    """Comments and READMEs included (e.g. the commented-out LB_TLS_CLIENT_CA of the tls component)."""
    known = server_env_names()
    paths = yaml_files() + sorted(K8S.rglob("*.md"))
    for path in paths:
        unknown = set(re.findall(r"\bLB_[A-Z0-9_]+\b", path.read_text())) - known
        assert not unknown, f"{path}: {sorted(unknown)} are no server flags"


def test_example_containers_set_only_variables_their_program_reads() -> None:
    objs, _ = build(K8S / "greet-example")
    for d in of_kind(objs, "Deployment"):
        for c in containers(d):
            command = c.get("command", [])
            if command[:2] != ["python", "-m"]:
                continue
            module = command[2]
            assert module.startswith("examples.")
            relative = module.removeprefix("examples.").replace(".", "/") + ".py"
            source = ROOT / "examples" / relative
            text = source.read_text()
            for var in env_of(c):
                assert f'"{var}"' in text, f"{d['metadata']['name']}: {source.name} does not read {var}"


@pytest.mark.parametrize(("host", "component"), component_builds())
def test_components_patch_existing_objects(host: str, component: str) -> None:
    """Each component renders on each overlay: every patch matches one object (checked by build)."""
    before, _ = build(K8S / host)
    after, _ = build(K8S / host, [K8S / "components" / component])
    kinds = {(o["kind"], o["metadata"]["name"]) for o in after}
    assert {(o["kind"], o["metadata"]["name"]) for o in before} <= kinds
    comp = load_docs(K8S / "components" / component / KUSTOMIZATION)[0]
    assert comp.get("patches") or comp.get("resources"), f"{component} changes nothing"


def test_endpoints_fallback_component_switches_the_source() -> None:
    from lookaside_server.__main__ import build_parser

    objs, namespace = build(K8S / "base", [K8S / "components" / "endpoints-fallback"])
    env = env_of(lookaside_container(objs))
    (source,) = [a for a in build_parser()._actions if "--source" in a.option_strings]
    assert env["LB_SOURCE"]["value"] == "endpoints" and "endpoints" in source.choices
    role = named(objs, "Role", "lookaside-endpoints")
    assert _grants(role, "", "endpoints")
    binding = named(objs, "RoleBinding", "lookaside-endpoints")
    assert binding["roleRef"]["name"] == "lookaside-endpoints"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lookaside", "namespace": namespace}]


@pytest.mark.parametrize("host", COMPONENT_HOSTS)
def test_service_monitor_component(host: str) -> None:
    objs, _ = build(K8S / host, [K8S / "components" / "service-monitor"])
    monitor = named(objs, "ServiceMonitor", "lookaside")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert [
        s["metadata"]["name"]
        for s in of_kind(objs, "Service")
        if selects(selector, s["metadata"].get("labels") or {})
    ] == ["lookaside"]
    assert "namespaceSelector" not in monitor["spec"], "the Service is in the monitor's own namespace"
    svc = named(objs, "Service", "lookaside")
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = [p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["port"] == HTTP_PORT and endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
    kustomization = (K8S / "components" / "service-monitor" / KUSTOMIZATION).read_text()
    assert "serviceMonitorSelector" in kustomization, "say how a Prometheus picks the monitor up"


@pytest.mark.parametrize("host", COMPONENT_HOSTS)
def test_network_policy_component(host: str) -> None:
    objs, _ = build(K8S / host, [K8S / "components" / "network-policy"])
    (policy,) = of_kind(objs, "NetworkPolicy")
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    selected = [
        d["metadata"]["name"]
        for d in of_kind(objs, "Deployment")
        if selects(spec["podSelector"]["matchLabels"], pod_labels(d))
    ]
    assert selected == ["lookaside"]
    assert spec["policyTypes"] == ["Ingress"], "ingress only: the server must reach the Kubernetes API"
    c = lookaside_container(objs)
    rules: dict[int, list[Obj]] = {}
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without peers admits everybody"
        for p in rule["ports"]:
            assert p.get("protocol", "TCP") == "TCP"
            rules.setdefault(container_port(c, p["port"])["containerPort"], []).extend(rule["from"])
    assert set(rules) == {GRPC_PORT, HTTP_PORT}, "every port of the server is covered, no other"
    # gRPC: the server's own namespace (every pod in it) and namespaces labelled as clients.
    grpc_peers = rules[GRPC_PORT]
    assert {"podSelector": {}} in grpc_peers
    assert all(set(peer) <= {"podSelector", "namespaceSelector"} for peer in grpc_peers)
    labelled = [
        peer["namespaceSelector"]["matchLabels"] for peer in grpc_peers if "namespaceSelector" in peer
    ]
    assert labelled and all(sel for sel in labelled), "never an empty namespaceSelector (all namespaces)"
    # HTTP: the monitoring namespace only.
    assert rules[HTTP_PORT] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    # The greet example's clients (same namespace) may still reach the gRPC port.
    if host == "greet-example":
        client = named(objs, "Deployment", "greet-client")
        assert client["metadata"].get("namespace") is None  # same namespace as the server


def test_tls_component_is_consistent() -> None:
    objs, _ = build(K8S / "tls")
    d = named(objs, "Deployment", "lookaside")
    pod = d["spec"]["template"]["spec"]
    c = lookaside_container(objs)
    env = env_of(c)
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == TLS_SECRET
    assert volume["secret"]["defaultMode"] == 0o440  # read by the pod's group only
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"] == 65532
    assert "items" not in volume["secret"], "mount every key: ca.crt is optional"
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert "subPath" not in mount, "a subPath mount never sees Secret updates: rotation would need a restart"
    directory = mount["mountPath"].rstrip("/")
    assert not any(m["mountPath"] == directory for m in c["volumeMounts"] if m is not mount)
    assert env["LB_TLS_CERT"]["value"] == f"{directory}/tls.crt"
    assert env["LB_TLS_KEY"]["value"] == f"{directory}/tls.key"
    assert "LB_TLS_CLIENT_CA" not in env, "mutual TLS is opt-in"
    # The commented-out mutual-TLS line points at the Secret's ca.crt, ready to uncomment.
    patch_text = (K8S / "components" / "tls" / "deployment-patch.yaml").read_text()
    commented = re.search(r"#\s*- name: LB_TLS_CLIENT_CA\s*\n\s*#\s*value: (\S+)", patch_text)
    assert commented and commented.group(1) == f"{directory}/ca.crt"
    uncommented = yaml.safe_load(
        re.sub(r"# (- name: LB_TLS_CLIENT_CA|  value: \S+/ca.crt)", r"\1", patch_text)
    )
    (patched,) = uncommented["spec"]["template"]["spec"]["containers"]
    assert {"name": "LB_TLS_CLIENT_CA", "value": f"{directory}/ca.crt"} in patched["env"]
    # The server accepts this configuration (files are only read at start, so none need to exist here).
    from lookaside_server.__main__ import build_parser

    args = build_parser().parse_args(
        ["--tls-cert", env["LB_TLS_CERT"]["value"], "--tls-key", env["LB_TLS_KEY"]["value"]]
    )
    assert args.tls_cert.endswith("tls.crt") and args.http_port is None


def test_every_container_is_hardened(rendered: tuple[str, list[Obj], str | None]) -> None:
    _, objs, _ = rendered
    for d in of_kind(objs, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        pod_sc = pod.get("securityContext", {})
        for c in containers(d):
            sc = c.get("securityContext", {})
            where = f"{d['metadata']['name']}/{c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert sc.get("privileged") in (None, False), where
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 65532)) != 0, where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            assert c["image"] == IMAGE, where
            assert c["resources"]["requests"] and c["resources"]["limits"], where
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe not in c:
                    continue
                handler = c[probe]
                if "grpc" in handler:
                    assert any(p["containerPort"] == handler["grpc"]["port"] for p in c["ports"]), where
                for kind in ("tcpSocket", "httpGet"):
                    if kind in handler:
                        assert port_matches(handler[kind]["port"], c), where


def test_pdb_selects_the_lookaside_deployment() -> None:
    objs, _ = build(K8S / "base")
    pdb = named(objs, "PodDisruptionBudget", "lookaside")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    deploy = named(objs, "Deployment", "lookaside")
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(deploy))
    assert deploy["spec"]["replicas"] > pdb["spec"]["minAvailable"]


def test_greet_example_wiring() -> None:
    objs, namespace = build(K8S / "greet-example")
    assert namespace == build(K8S / "base")[1], "the namespaced Role only covers the lookaside namespace"
    server = named(objs, "Deployment", "greet")
    assert server["spec"]["replicas"] == 3
    (sc,) = server["spec"]["template"]["spec"]["containers"]
    assert sc["command"] == [
        "python",
        "-m",
        "examples.greet.server",
        "--host",
        "0.0.0.0",
        "--port",
        "50051",
    ]
    assert sc["ports"][0] == {"name": "grpc", "containerPort": 50051, "protocol": "TCP"}
    greet_svc = named(objs, "Service", "greet")
    assert [(p["name"], p["port"]) for p in greet_svc["spec"]["ports"]] == [("grpc", 50051)]

    client = named(objs, "Deployment", "greet-client")
    (cc,) = client["spec"]["template"]["spec"]["containers"]
    assert cc["command"] == ["python", "-m", "examples.greet.client"]
    assert "0" == cc["args"][cc["args"].index("--count") + 1], "a Deployment's client must not exit"
    env = {e["name"]: e for e in cc["env"]}
    host, port = env["LOOKASIDE_ADDR"]["value"].split(":")
    lookaside_svc = named(objs, "Service", host)
    assert int(port) in [p["port"] for p in lookaside_svc["spec"]["ports"]]
    named(objs, "Service", env["GREET_SERVICE"]["value"])
    assert env["GREET_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"

    # The REST gateway is part of the example: an HTTP Service in front of it, the same lookaside.
    gateway = named(objs, "Deployment", "greet-gateway")
    (gc,) = gateway["spec"]["template"]["spec"]["containers"]
    assert gc["command"] == ["python", "-m", "examples.gateway"]
    genv = env_of(gc)
    assert genv["LOOKASIDE_ADDR"] == env["LOOKASIDE_ADDR"]
    assert genv["GREET_SERVICE"] == env["GREET_SERVICE"]
    assert container_port(gc, "http")["containerPort"] == int(genv["GATEWAY_PORT"]["value"])
    gsvc = named(objs, "Service", "greet-gateway")
    assert [(p["name"], p["targetPort"]) for p in gsvc["spec"]["ports"]] == [("http", "http")]
    assert not (K8S / "greet-example" / "gateway").exists(), "folded into greet-example"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    images = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f.split()[0]) for f in froms]
    assert images and all(i == "python:3.11-slim" for i in images), images
    final = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    last_stage = instructions[final:]
    users = [rest for word, rest in last_stage if word == "USER"]
    assert users, "the final stage must set a USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == 65532, "a numeric non-root uid lets runAsNonRoot be verified"
    entry = [rest for word, rest in last_stage if word == "ENTRYPOINT"]
    assert entry and entry[-1] == '["lookaside-server"]'
    from lookaside_server.__main__ import DEFAULT_HTTP_PORT
    from lookaside_server._app import DEFAULT_PORT

    exposed = {port for word, rest in last_stage if word == "EXPOSE" for port in rest.split()}
    assert exposed == {str(DEFAULT_PORT), str(DEFAULT_HTTP_PORT)} == {str(GRPC_PORT), str(HTTP_PORT)}
    env_text = " ".join(rest for word, rest in instructions if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env_text
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert 'pip install ".[server]"' in runs
    assert "compileall" in " ".join(rest for word, rest in last_stage if word == "RUN")
    # Every COPY source from the build context exists (the context is the repository root).
    for word, rest in instructions:
        if word == "COPY" and "--from" not in rest:
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
    # The project's console script is the entrypoint the image runs.
    assert 'lookaside-server = "lookaside_grpc._server_entry:main"' in (ROOT / "pyproject.toml").read_text()


# --- kubectl kustomize, when available --------------------------------------------------------------------

KUBECTL = shutil.which("kubectl")


def kustomize(directory: pathlib.Path) -> list[Obj]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {directory}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def _summary(objs: list[Obj]) -> tuple[object, ...]:
    c = lookaside_container(objs)
    svc = named(objs, "Service", "lookaside")
    return (
        sorted((o["kind"], o["metadata"]["name"]) for o in objs),
        sorted((e["name"], e.get("value")) for e in c["env"]),
        {
            p: sorted(
                set(c[p]) - {"failureThreshold", "periodSeconds", "timeoutSeconds", "initialDelaySeconds"}
            )
            for p in ("startupProbe", "readinessProbe", "livenessProbe")
        },
        sorted((m["name"], m["mountPath"]) for m in c.get("volumeMounts", [])),
        sorted((p["name"], p.get("appProtocol")) for p in svc["spec"]["ports"]),
    )


def test_kubectl_kustomize_agrees(tmp_path: pathlib.Path) -> None:
    """kubectl's own kustomize renders every build as our checks read it (kubectl ships with the machine)."""
    assert KUBECTL is not None, "kubectl not found on PATH: it is needed to render the Kustomize builds"
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    builds = {b: (tree / b, []) for b in BUILDS}
    for host, comp in component_builds():
        overlay = tree / f"{host}-{comp}"
        overlay.mkdir()
        (overlay / KUSTOMIZATION).write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    # as the components' READMEs say: an overlay names its namespace, or a component's own
                    # objects (the endpoints Role) would land in whatever namespace kubectl defaults to
                    "namespace": "default",
                    "resources": [f"../{host}"],
                    "components": [f"../components/{comp}"],
                }
            )
        )
        builds[f"{host}+{comp}"] = (overlay, [])
    for name, (directory, extra) in builds.items():
        ours, _ = build(directory, extra)
        theirs = kustomize(directory)
        assert _summary(ours) == _summary(theirs), name
        for o in theirs:
            if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
                assert o["metadata"].get("namespace") == "default", (name, o["kind"], o["metadata"]["name"])
