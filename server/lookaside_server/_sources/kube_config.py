"""Kubernetes client configuration: in-cluster or kubeconfig, the server's own namespace, the allow-list."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
#: Allow-list entry meaning "every namespace".
ALL_NAMESPACES = "*"


def make_api_client(kubeconfig: str | None = None, pool_size: int = 64):  # noqa: ANN201 - lazy import
    """A ``kubernetes.client.ApiClient``: in-cluster config when running in a pod (KUBERNETES_SERVICE_HOST
    set and no explicit kubeconfig), else ``kubeconfig`` / KUBECONFIG / ~/.kube/config.

    ``pool_size`` bounds the kept HTTP connections (each watched target holds one while it streams).
    Raises ``kubernetes.config.ConfigException`` (or OSError) when no configuration can be loaded.
    """
    from kubernetes import client, config

    cfg = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
        config.load_incluster_config(client_configuration=cfg)
        log.info("kubernetes: in-cluster configuration (%s)", cfg.host)
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        log.info("kubernetes: kubeconfig %s (%s)", where, cfg.host)
    cfg.connection_pool_maxsize = max(int(cfg.connection_pool_maxsize or 0), pool_size)
    return client.ApiClient(cfg)


def own_namespace(kubeconfig: str | None = None) -> str | None:
    """The namespace the server runs in: POD_NAMESPACE, the service account's namespace file, else (outside
    a cluster) the kubeconfig's current-context namespace; None if none is known."""
    if ns := os.environ.get("POD_NAMESPACE", "").strip():
        return ns
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
            if ns := f.read().strip():
                return ns
    except OSError:
        pass
    try:
        from kubernetes import config

        _, active = config.list_kube_config_contexts(kubeconfig)
        return (active or {}).get("context", {}).get("namespace") or None
    except Exception:  # noqa: BLE001 - no kubeconfig: nothing known
        return None


def parse_allow_namespaces(values: Iterable[str] | None) -> frozenset[str] | None:
    """``--allow-namespace`` values (repeatable, each comma-separated) as a set; None if ``*`` is among them
    (every namespace allowed) or no value is given. Raise ValueError on an empty list of names."""
    names: set[str] = set()
    given = False
    for value in values or ():
        given = True
        for part in value.split(","):
            part = part.strip()
            if part == ALL_NAMESPACES:
                return None
            if part:
                names.add(part)
    if given and not names:
        raise ValueError("--allow-namespace needs at least one namespace (or '*' for all)")
    return frozenset(names) if given else None
