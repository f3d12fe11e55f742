"""The one ``Target`` type and its one grammar, ``service.namespace[.svc[.cluster.local]][:port]``.

Used by the client (factories, interceptor routes), the operator CLI, the server (Resolve/Watch names) and
xDS resource names, so every spelling of one Kubernetes Service port canonicalises to the same value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_RFC1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_RFC1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
MAX_LABEL = 63
#: DNS suffixes of a Service name that name the same Service (longest first).
_SUFFIXES = (".svc.cluster.local", ".svc")

TargetField = Literal["target", "service", "namespace", "port"]


class InvalidTarget(ValueError):
    """A target (or one of its parts) that is not a Kubernetes Service port; ``field`` names the part."""

    def __init__(self, field: TargetField, message: str) -> None:
        super().__init__(message)
        self.field: TargetField = field


def service_problem(name: str) -> str | None:
    """Why ``name`` is not a valid Service name (an RFC 1035 label), or None if it is."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_LABEL:
        return f"must be at most {MAX_LABEL} characters"
    if not _RFC1035.fullmatch(name):
        return (
            "must be an RFC 1035 label: lowercase letters, digits or '-', starting with a letter, "
            "ending alphanumeric"
        )
    return None


def namespace_problem(name: str) -> str | None:
    """Why ``name`` is not a valid namespace (an RFC 1123 label), or None if it is."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_LABEL:
        return f"must be at most {MAX_LABEL} characters"
    if not _RFC1123.fullmatch(name):
        return "must be an RFC 1123 label: lowercase letters, digits or '-', starting and ending alphanumeric"
    return None


def port_name_problem(name: str) -> str | None:
    """Why ``name`` is not a usable port name (an RFC 1123 label with at least one letter), or None."""
    if len(name) > MAX_LABEL or not _RFC1123.fullmatch(name):
        return "must be an RFC 1123 label"
    if name.isdigit():
        return "must contain a letter (digits alone select a port by number)"
    return None


def port_number(text: str) -> int | None:
    """The port number ``text`` spells: 1-65535, -1 for digits out of that range, None if it is not ASCII
    digits (then it names a port). ``str.isdigit`` alone is not enough: "²" is a digit ``int()`` refuses,
    and ``int()`` refuses more than 4300 digits."""
    if not (text.isascii() and text.isdigit()):
        return None
    if len(text.lstrip("0")) > 5:
        return -1
    number = int(text)
    return number if 0 < number < 65536 else -1


def canonical_port(port: str | int) -> str:
    """``port`` as a Target holds it: "" (the only/first port), a port name, or a number without leading
    zeros; raise :class:`InvalidTarget` for anything else."""
    if isinstance(port, bool) or not isinstance(port, (str, int)):
        raise InvalidTarget("port", f"port must be a name or a number, got {port!r}")
    text = str(port)
    if text == "":
        return ""
    number = port_number(text)
    if number is not None:
        if number < 0:
            raise InvalidTarget("port", f"port {text[:20]!r} is out of range 1-65535")
        return str(number)
    if problem := port_name_problem(text):
        raise InvalidTarget("port", f"port name {text[:80]!r} {problem}")
    return text


@dataclass(frozen=True, slots=True, init=False)
class Target:
    """A Kubernetes Service port: ``service.namespace[:port]``, validated and canonical.

    ``port`` is "" (the Service's only or first port), a port name, or a Service port number
    (``spec.ports[].port``, not the pods' ``targetPort``; held as canonical decimal text, so
    ``Target("greet", "default", 80) == Target.parse("greet.default:080")``).
    """

    service: str
    namespace: str
    port: str

    def __init__(self, service: str, namespace: str, port: str | int = "") -> None:
        if not isinstance(service, str) or (problem := service_problem(service)):
            raise InvalidTarget("service", f"service {str(service)[:80]!r} {problem or 'must be a string'}")
        if not isinstance(namespace, str) or (problem := namespace_problem(namespace)):
            raise InvalidTarget(
                "namespace", f"namespace {str(namespace)[:80]!r} {problem or 'must be a string'}"
            )
        object.__setattr__(self, "service", service)
        object.__setattr__(self, "namespace", namespace)
        object.__setattr__(self, "port", canonical_port(port))

    @classmethod
    def parse(cls, value: Target | str) -> Target:
        """A ``Target`` as is, or ``service.namespace[.svc[.cluster.local]][:port]``."""
        if isinstance(value, Target):
            return value
        if not isinstance(value, str) or not value:
            raise InvalidTarget(
                "target", f"a target must be 'service.namespace[:port]' or a Target, got {value!r}"
            )
        host, sep, port = value.partition(":")
        if sep and not port:
            raise InvalidTarget("port", f"{value[:120]!r}: empty port after ':'")
        for suffix in _SUFFIXES:
            if host.endswith(suffix):
                host = host[: -len(suffix)]
                break
        if host.count(".") != 1:
            raise InvalidTarget(
                "target", f"{value[:120]!r}: expected service.namespace[.svc[.cluster.local]][:port]"
            )
        service, namespace = host.split(".")
        return cls(service, namespace, port)

    @property
    def port_number(self) -> int | None:
        """The port as a number, or None when it is empty or a name."""
        return int(self.port) if self.port.isdigit() else None

    def with_port(self, port: str | int) -> Target:
        """The same Service with another port ("" for the only/first one)."""
        return Target(self.service, self.namespace, port)

    @property
    def service_key(self) -> str:
        """``namespace/service``: the Service without its port (how static files and logs name it)."""
        return f"{self.namespace}/{self.service}"

    def __str__(self) -> str:
        return f"{self.service}.{self.namespace}" + (f":{self.port}" if self.port else "")

    def __repr__(self) -> str:
        return f"Target({str(self)!r})"
