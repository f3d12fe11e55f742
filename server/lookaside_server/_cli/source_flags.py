"""Command-line flags choosing the endpoint source (static file, EndpointSlices, Endpoints) and its knobs."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from lookaside_server._cli.flags import env_argument, integer, number, one_of
from lookaside_server._sources.base import EndpointSource
from lookaside_server._sources.kube_config import own_namespace, parse_allow_namespaces

log = logging.getLogger(__name__)

SOURCES = ("endpointslices", "endpoints", "static")


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """The source flags; each falls back to an environment variable, then a built-in default."""
    env_argument(
        p,
        "--source",
        env="LB_SOURCE",
        choices=SOURCES,
        type=one_of(SOURCES),
        help="where endpoints come from (default: 'static' when --static-file is given, else "
        "'endpointslices'; 'endpoints' reads core/v1 Endpoints on old clusters)",
    )
    p.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file when not running in a pod (default: KUBECONFIG, then "
        "~/.kube/config; in a pod the service account is used)",
    )
    s = p.add_argument_group("static file source")
    env_argument(
        s,
        "--static-file",
        env="LB_STATIC_FILE",
        help="YAML/JSON file of 'namespace/service' -> endpoints; changes are seen at once through "
        "inotify where the platform has it, else by polling",
    )
    env_argument(
        s,
        "--poll-interval",
        env="LB_POLL_INTERVAL",
        type=number(above=0),
        default=1.0,
        help="seconds between looks at the static file (the only change detection without inotify, "
        "a safety net with it)",
    )
    k = p.add_argument_group("Kubernetes sources")
    env_argument(
        k,
        "--resync-interval",
        env="LB_RESYNC_INTERVAL",
        type=number(above=0),
        default=300.0,
        help="seconds between full re-lists of each watched namespace (its Services and endpoints)",
    )
    env_argument(
        k,
        "--watch-timeout",
        env="LB_WATCH_TIMEOUT",
        type=number(1),
        default=240.0,
        help="timeoutSeconds of each Kubernetes WATCH request before it is resumed",
    )
    env_argument(
        k,
        "--idle-timeout",
        env="LB_IDLE_TIMEOUT",
        type=number(0),
        default=600.0,
        help="stop watching a Service nobody resolved or watched for this many seconds; 0 = never",
    )
    env_argument(
        p,
        "--max-targets",
        env="LB_MAX_TARGETS",
        type=integer(1),
        default=1000,
        help="most Services tracked at once (static file: those still in the file); more answer "
        "RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--allow-namespace",
        action="append",
        default=None,
        metavar="NS[,NS...]",
        help="namespaces clients may resolve, repeatable or comma-separated, '*' for all "
        "(LB_ALLOW_NAMESPACES; default for Kubernetes sources: the server's own namespace; "
        "for the static source: all)",
    )


@dataclass(frozen=True)
class SourceChoice:
    """What the flags select: a source (None: the static file) and the namespace allow-list."""

    kind: str
    source: EndpointSource | None
    allow_namespaces: frozenset[str] | None


def choose_source(args: argparse.Namespace) -> SourceChoice:
    """Build the source the flags ask for; ValueError for bad flags, kubernetes ConfigException/OSError when
    no Kubernetes configuration can be loaded."""
    kind = args.source or ("static" if args.static_file else "endpointslices")
    values = args.allow_namespace
    if not values and os.environ.get("LB_ALLOW_NAMESPACES"):
        values = [os.environ["LB_ALLOW_NAMESPACES"]]
    allow = parse_allow_namespaces(values)
    if kind == "static":
        if not args.static_file:
            raise ValueError("the static source needs --static-file (or LB_STATIC_FILE)")
        return SourceChoice(kind, None, allow)
    from lookaside_server._sources.kubernetes import KubernetesSource, KubeTimings

    timings = KubeTimings(resync_interval=args.resync_interval, watch_timeout=args.watch_timeout)
    # Every namespace allowed ('*'): one cluster-wide watch instead of one per namespace in use.
    source = KubernetesSource(
        kind=kind,
        kubeconfig=args.kubeconfig,
        timings=timings,
        idle_timeout=args.idle_timeout if args.idle_timeout > 0 else None,
        max_targets=args.max_targets,
        cluster_wide=bool(values) and allow is None,
    )
    if not values:
        ns = own_namespace(args.kubeconfig) or "default"
        allow = frozenset({ns})
        log.info("serving namespace %s only (--allow-namespace / LB_ALLOW_NAMESPACES to change)", ns)
    return SourceChoice(kind, source, allow)
