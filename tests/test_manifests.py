"""Static consistency checks of the Kubernetes manifests (server/k8s) and the server Dockerfile.

No cluster and no kustomize binary: the kustomizations are followed by hand (resources, components and
inline ``$patch: delete`` patches), which is all these layouts use.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = ROOT / "server" / "k8s"
DOCKERFILE = ROOT / "server" / "Dockerfile"
BUILDS = ["base", "cluster-wide", "greet-example"]
IMAGE = "lookaside-grpc:latest"
READ_VERBS = {"get", "list", "watch"}
KUSTOMIZATION = "kustomization.yaml"

Obj = dict[str, Any]


def load_docs(path: pathlib.Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def yaml_files() -> list[pathlib.Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def kustomizations() -> list[pathlib.Path]:
    return sorted(K8S.rglob(KUSTOMIZATION))


def build(directory: pathlib.Path) -> tuple[list[Obj], str | None]:
    """The objects a kustomization renders (resources, components, delete patches) and its namespace."""
    k = load_docs(directory / KUSTOMIZATION)[0]
    objs: list[Obj] = []
    namespace = k.get("namespace")
    for entry in list(k.get("resources", [])) + list(k.get("components", [])):
        target = (directory / entry).resolve()
        if target.is_dir():
            sub, sub_ns = build(target)
            namespace = namespace or sub_ns
            objs.extend(sub)
        else:
            objs.extend(load_docs(target))
    for patch in k.get("patches", []):
        doc = yaml.safe_load(patch["patch"]) if "patch" in patch else load_docs(directory / patch["path"])[0]
        if doc.get("$patch") == "delete":
            before = len(objs)
            objs = [
                o
                for o in objs
                if (o["kind"], o["metadata"]["name"]) != (doc["kind"], doc["metadata"]["name"])
            ]
            assert len(objs) == before - 1, f"{directory}: delete patch matches nothing: {doc}"
    return objs, namespace


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


@pytest.fixture(params=BUILDS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Obj], str | None]:
    objs, namespace = build(K8S / request.param)
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
    # The optional component is valid on its own, even if no build includes it by default.
    comp = load_docs(K8S / "components" / "endpoints-fallback" / KUSTOMIZATION)[0]
    assert comp["kind"] == "Component"


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
            target = port.get("targetPort", port["port"])
            assert any(port_matches(target, c) for c in containers(deploy)), (svc["metadata"]["name"], target)
            assert port["name"] == "grpc" and port.get("protocol", "TCP") == "TCP"


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
    if name == "cluster-wide":
        assert of_kind(objs, "Role") == [] and of_kind(objs, "RoleBinding") == []
        assert [r["kind"] for r in roles] == ["ClusterRole"]
    else:
        assert [r["kind"] for r in roles] == ["Role"]


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
    _, objs, _ = rendered
    d = named(objs, "Deployment", "lookaside")
    assert d["spec"]["replicas"] == 2
    (c,) = d["spec"]["template"]["spec"]["containers"]
    (port,) = c["ports"]
    assert port == {"name": "grpc", "containerPort": 50055, "protocol": "TCP"}
    env = {e["name"]: e for e in c["env"]}
    assert env["LB_PORT"]["value"] == str(port["containerPort"])
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port["containerPort"], probe  # grpc probes take numbers only
        assert set(c[probe]) & {"httpGet", "tcpSocket", "exec"} == set()
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["resources"]["limits"]["memory"]
    svc = named(objs, "Service", "lookaside")
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("grpc", 50055)]


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
        "lookaside_examples.greet.server",
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
    assert cc["command"] == ["python", "-m", "lookaside_examples.greet.client"]
    assert "0" == cc["args"][cc["args"].index("--count") + 1], "a Deployment's client must not exit"
    env = {e["name"]: e for e in cc["env"]}
    host, port = env["LOOKASIDE_ADDR"]["value"].split(":")
    lookaside_svc = named(objs, "Service", host)
    assert int(port) in [p["port"] for p in lookaside_svc["spec"]["ports"]]
    named(objs, "Service", env["GREET_SERVICE"]["value"])
    assert env["GREET_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


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
    assert ("EXPOSE", "50055") in last_stage
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
    assert 'lookaside-server = "lookaside_server.__main__:main"' in (ROOT / "pyproject.toml").read_text()
