"""Access control: which targets may be resolved, and (with mutual TLS) which clients may ask at all.

One :class:`AccessPolicy` per server is used by every RPC:

* **target rules** (Resolve, Watch, Status with a target, ReportLoad, and each xDS resource name): the
  namespace allow-list (``--allow-namespace``), then per-namespace service rules (``--allow-service ns/svc``,
  ``ns/*``): once any rule names a namespace, only the listed services of that namespace may be resolved.
  Service rules refine the namespace allow-list, they never widen it.
* **client identity** (every RPC except ``grpc.health.v1.Health``, checked by the server interceptor in
  :mod:`lookaside_server._security.guard`): the peer's certificate identities (its SANs: URI such as
  ``spiffe://cluster.local/ns/x/sa/y``, DNS, IP; the subject CN only when it has no SAN) must match one of
  the ``--allow-client-identity`` globs. Needs mutual TLS.

A denial ends the RPC with PERMISSION_DENIED naming the rule and its flag, is logged and counted by reason
(``namespace``, ``service``, ``identity``). An xDS resource name that is denied gets no resource (the client
reports it missing), the same as an unknown one; an xDS stream from a disallowed identity is refused with
PERMISSION_DENIED like any other RPC.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc

from lookaside_grpc.protocol import InvalidTarget
from lookaside_server._core.errors import abort
from lookaside_server._core.model import Target
from lookaside_server._web.logging import bind_target

log = logging.getLogger(__name__)

#: Services the identity rule does not cover (probes must work without an allowed identity).
IDENTITY_EXEMPT = frozenset({"grpc.health.v1.Health"})

NAMESPACE = "namespace"
SERVICE = "service"
IDENTITY = "identity"
REASONS = (NAMESPACE, SERVICE, IDENTITY)


@dataclass(frozen=True, slots=True)
class Denial:
    """Why an access was refused: ``reason`` (one of :data:`REASONS`) and a message naming rule and flag."""

    reason: str
    message: str


def parse_service_rules(values: Iterable[str] | None) -> dict[str, frozenset[str]]:
    """``ns/svc`` or ``ns/*`` (repeatable, comma-separated) -> namespace -> services (``*`` = all of it);
    ValueError for a malformed rule."""
    rules: dict[str, set[str]] = {}
    for value in values or ():
        for item in str(value).split(","):
            item = item.strip()
            if not item:
                continue
            namespace, slash, service = item.partition("/")
            if not slash:
                raise ValueError(f"--allow-service {item!r}: expected <namespace>/<service> or <namespace>/*")
            try:
                Target("x" if service == "*" else service, namespace)
            except InvalidTarget as e:
                raise ValueError(f"--allow-service {item!r}: {e}") from None
            rules.setdefault(namespace, set()).add(service)
    return {ns: frozenset(svcs) for ns, svcs in rules.items()}


def parse_identities(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """``--allow-client-identity`` globs (repeatable, comma-separated); None when none is given."""
    out = [v.strip() for value in values or () for v in str(value).split(",") if v.strip()]
    return tuple(out) or None


def peer_identities(context: grpc.aio.ServicerContext) -> list[str]:
    """The client certificate's identities: its SANs (URI, DNS, IP, email), or the subject CN without SANs;
    empty without a verified client certificate."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - no auth context: no identity
        return []
    values = auth.get("x509_subject_alternative_name") or auth.get("x509_common_name") or []
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


class AccessPolicy:
    """The namespace allow-list, per-namespace service rules and the client identity rule."""

    def __init__(
        self,
        allow_namespaces: Iterable[str] | None = None,
        allow_services: Mapping[str, Iterable[str]] | None = None,
        client_identities: Iterable[str] | None = None,
        on_deny: Callable[[str], None] | None = None,
    ) -> None:
        #: None = every namespace.
        self.allow_namespaces = frozenset(allow_namespaces) if allow_namespaces is not None else None
        self.allow_services = {ns: frozenset(s) for ns, s in (allow_services or {}).items()}
        #: None = any client (the identity rule is off).
        self.client_identities = tuple(client_identities) if client_identities is not None else None
        #: Called with the reason of every denial (the server counts them).
        self.on_deny = on_deny
        if self.allow_namespaces is not None:
            for ns in sorted(set(self.allow_services) - self.allow_namespaces):
                log.warning(
                    "--allow-service rules for namespace %r have no effect: the namespace is not in "
                    "the namespace allow-list (--allow-namespace)",
                    ns,
                )

    @property
    def checks_identity(self) -> bool:
        """Whether the client identity rule is on."""
        return self.client_identities is not None

    def _denied(self, denial: Denial) -> Denial:
        log.warning("access denied (%s): %s", denial.reason, denial.message)
        if self.on_deny is not None:
            try:
                self.on_deny(denial.reason)
            except Exception:  # noqa: BLE001 - counting must not break the RPC
                log.exception("counting a denial failed")
        return denial

    # --- targets ---------------------------------------------------------------------------------------

    def target_denial(self, target: Target) -> Denial | None:
        """Why ``target`` may not be served (logged and counted), or None if it may."""
        ns, svc = target.namespace, target.service
        name = f"{ns}/{svc}"
        if self.allow_namespaces is not None and ns not in self.allow_namespaces:
            return self._denied(
                Denial(
                    NAMESPACE,
                    (
                        f"target {name!r}: namespace {ns!r} is not served by this lookaside server (allowed: "
                        f"{', '.join(sorted(self.allow_namespaces)) or 'none'}; see --allow-namespace / "
                        "LB_ALLOW_NAMESPACES)"
                    ),
                )
            )
        services = self.allow_services.get(ns)
        if services is not None and "*" not in services and svc not in services:
            return self._denied(
                Denial(
                    SERVICE,
                    (
                        f"target {name!r}: service {svc!r} is not among the services of namespace {ns!r} "
                        f"this lookaside server may resolve (allowed: {', '.join(sorted(services))}; see "
                        "--allow-service / LB_ALLOW_SERVICES)"
                    ),
                )
            )
        return None

    async def check_target(self, context: grpc.aio.ServicerContext, target: Target) -> None:
        """End the RPC with PERMISSION_DENIED unless ``target`` may be served; binds it to the log context."""
        bind_target(str(target))
        denial = self.target_denial(target)
        if denial is not None:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, denial.message)

    # --- clients ---------------------------------------------------------------------------------------

    def identity_allowed(self, identities: Iterable[str]) -> bool:
        """Whether one of ``identities`` matches an allowed glob (always True when the rule is off)."""
        if self.client_identities is None:
            return True
        return any(fnmatch.fnmatchcase(i, pattern) for i in identities for pattern in self.client_identities)

    def identity_denial(self, context: grpc.aio.ServicerContext, service: str) -> Denial | None:
        """Why this client may not call ``service`` (logged and counted), or None if it may."""
        if self.client_identities is None or service in IDENTITY_EXEMPT:
            return None
        identities = peer_identities(context)
        if self.identity_allowed(identities):
            return None
        shown = ", ".join(identities) if identities else "none (no verified client certificate)"
        return self._denied(
            Denial(
                IDENTITY,
                (
                    f"client identity {shown} is not allowed to use this lookaside server (allowed: "
                    f"{', '.join(self.client_identities)}; see --allow-client-identity / "
                    "LB_ALLOW_CLIENT_IDENTITIES)"
                ),
            )
        )
