"""Command-line flags choosing the endpoint source (static file, EndpointSlices, Endpoints) and its knobs."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from lookaside_server._sources.base import EndpointSource
from lookaside_server._sources.kube_config import own_namespace, parse_allow_namespaces

log = logging.getLogger(__name__)

SOURCES = ("endpointslices", "endpoints", "static")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """The source flags; each falls back to an environment variable, then a built-in default."""
    p.add_argument("--source", choices=SOURCES, default=os.environ.get("LB_SOURCE") or None,
                   help="where endpoints come from (LB_SOURCE; default: 'static' when --static-file is "
                        "given, else 'endpointslices'; 'endpoints' reads core/v1 Endpoints on old clusters)")
    p.add_argument("--kubeconfig", default=None,
                   help="kubeconfig file when not running in a pod (default: KUBECONFIG, then "
                        "~/.kube/config; in a pod the service account is used)")
    p.add_argument("--resync-interval", type=float, default=float(_env("LB_RESYNC_INTERVAL", "300")),
                   help="seconds between full re-lists of each watched Service (LB_RESYNC_INTERVAL; "
                        "default %(default)s)")
    p.add_argument("--watch-timeout", type=float, default=float(_env("LB_WATCH_TIMEOUT", "240")),
                   help="timeoutSeconds of each Kubernetes WATCH request before it is resumed "
                        "(LB_WATCH_TIMEOUT; default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=float(_env("LB_IDLE_TIMEOUT", "600")),
                   help="stop watching a Service nobody resolved or watched for this many seconds; 0 = never "
                        "(LB_IDLE_TIMEOUT; default %(default)s)")
    p.add_argument("--max-targets", type=int, default=int(_env("LB_MAX_TARGETS", "1000")),
                   help="most Services watched at once; more answer RESOURCE_EXHAUSTED (LB_MAX_TARGETS; "
                        "default %(default)s)")
    p.add_argument("--allow-namespace", action="append", default=None, metavar="NS[,NS...]",
                   help="namespaces clients may resolve, repeatable or comma-separated, '*' for all "
                        "(LB_ALLOW_NAMESPACES; default for Kubernetes sources: the server's own namespace; "
                        "for the static source: all)")


@dataclass
class SourceChoice:
    """What the flags select: a source (None: ServerConfig's static file) and the namespace allow-list."""

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
    if args.max_targets < 1:
        raise ValueError("--max-targets must be at least 1")
    if args.resync_interval <= 0 or args.watch_timeout < 1:
        raise ValueError("--resync-interval must be positive and --watch-timeout at least 1 second")
    from lookaside_server._sources.kubernetes import KubernetesSource, KubeTimings

    timings = KubeTimings(resync_interval=args.resync_interval, watch_timeout=args.watch_timeout)
    source = KubernetesSource(kind=kind, kubeconfig=args.kubeconfig, timings=timings,
                              idle_timeout=args.idle_timeout if args.idle_timeout > 0 else None,
                              max_targets=args.max_targets)
    if not values:
        ns = own_namespace(args.kubeconfig) or "default"
        allow = frozenset({ns})
        log.info("serving namespace %s only (--allow-namespace / LB_ALLOW_NAMESPACES to change)", ns)
    return SourceChoice(kind, source, allow)
