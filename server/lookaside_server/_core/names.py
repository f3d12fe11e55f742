"""Validation of Kubernetes names (RFC 1035/1123 labels, port names), shared by the RPC layer and sources."""

from __future__ import annotations

import re

_RFC1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_RFC1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
MAX_LABEL = 63


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
