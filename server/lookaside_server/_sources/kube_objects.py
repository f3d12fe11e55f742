"""Pure conversion of Kubernetes objects (raw JSON dicts, camelCase) to :class:`BackendEndpoint` tuples.

* discovery.k8s.io/v1 EndpointSlices: every slice of a Service is merged (keyed by slice name by the
  caller); endpoint x port is flattened; conditions follow the API defaults (``ready`` unset = ready,
  ``serving`` unset = ``ready``, ``terminating`` unset = false); an address present in two slices
  (transiently, while the controller moves it) is kept once, with its best conditions; IPv4 and IPv6
  slices are used, FQDN slices ignored; only TCP ports with a number count.
* core/v1 Endpoints (the fallback for old clusters): ``subsets[].addresses`` x ``subsets[].ports``, all ready;
  ``notReadyAddresses`` are ignored.

The result is sorted deterministically (Service port order, then address, then port) so that an
unchanged state compares equal whatever order the API returned the slices in, and the first endpoint
carries the Service's first port (the default port of a Resolve without ``port``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lookaside_server._core.model import BackendEndpoint, Endpoints

Obj = Mapping[str, Any]

#: Label tying an EndpointSlice to its Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_IP_TYPES = {"IPv4", "IPv6"}


def normalize_ip(address: object) -> str | None:
    """The canonical text of an IP address (IPv6 compressed, no brackets), or None if it is not one."""
    if not isinstance(address, str):
        return None
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        return None


def _tcp_ports(ports: Iterable[Obj] | None) -> list[tuple[str, int]]:
    out = []
    for p in ports or ():
        number = p.get("port")
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
            continue  # a nil port means "all ports": nothing a client can dial
        if (p.get("protocol") or "TCP") != "TCP":
            continue
        out.append((p.get("name") or "", number))
    return out


def _flag(value: object, default: bool) -> bool:
    return default if value is None else bool(value)


def slice_endpoints(obj: Obj) -> list[BackendEndpoint]:
    """The endpoints of one EndpointSlice (endpoint x TCP port); FQDN slices give none."""
    if obj.get("addressType") not in _IP_TYPES:
        return []
    ports = _tcp_ports(obj.get("ports"))
    out: list[BackendEndpoint] = []
    for ep in obj.get("endpoints") or ():
        addresses = ep.get("addresses") or ()
        # "consumers ... may choose to only use the first element" (the addresses are fungible)
        ip = normalize_ip(addresses[0]) if addresses else None
        if ip is None:
            continue
        cond = ep.get("conditions") or {}
        ready = _flag(cond.get("ready"), True)
        serving = _flag(cond.get("serving"), ready)
        terminating = _flag(cond.get("terminating"), False)
        hints = ep.get("hints") or {}
        for_zones = tuple(z["name"] for z in hints.get("forZones") or () if isinstance(z, Mapping)
                          and isinstance(z.get("name"), str))
        zone = ep.get("zone") or ""
        for name, number in ports:
            out.append(BackendEndpoint(ip=ip, port=number, port_name=name, zone=zone, for_zones=for_zones,
                                       ready=ready, serving=serving, terminating=terminating))
    return out


def endpoints_object_endpoints(obj: Obj) -> list[BackendEndpoint]:
    """The ready endpoints of a core/v1 Endpoints object (``notReadyAddresses`` ignored)."""
    out: list[BackendEndpoint] = []
    for subset in obj.get("subsets") or ():
        ports = _tcp_ports(subset.get("ports"))
        for address in subset.get("addresses") or ():
            ip = normalize_ip(address.get("ip"))
            if ip is None:
                continue
            out.extend(BackendEndpoint(ip=ip, port=number, port_name=name) for name, number in ports)
    return out


def _rank(e: BackendEndpoint) -> tuple[int, int, int]:
    """Higher is better: ready, then serving, then not terminating."""
    return (e.ready and not e.terminating, e.serving, not e.terminating)  # type: ignore[return-value]


def _ip_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)


def merge(endpoints: Iterable[BackendEndpoint], port_order: Sequence[str] = ()) -> Endpoints:
    """De-duplicate (same ip, port and port name: keep the best conditions, first seen on a tie) and sort."""
    best: dict[tuple[str, int, str], BackendEndpoint] = {}
    first_seen: dict[str, int] = {}
    for e in endpoints:
        first_seen.setdefault(e.port_name, len(first_seen))
        ident = (e.ip, e.port, e.port_name)
        old = best.get(ident)
        if old is None or _rank(e) > _rank(old):
            best[ident] = e
    order = {name: i for i, name in enumerate(dict.fromkeys(port_order))}

    def sort_key(e: BackendEndpoint) -> tuple[int, int, str, tuple[int, int], int]:
        rank = order.get(e.port_name)
        if rank is not None:
            return (0, rank, "", _ip_key(e.ip), e.port)
        return (1, first_seen[e.port_name], e.port_name, _ip_key(e.ip), e.port)

    return tuple(sorted(best.values(), key=sort_key))


def merge_slices(slices: Mapping[str, Obj], port_order: Sequence[str] = ()) -> Endpoints:
    """The state of a Service from all its EndpointSlices (by slice name, merged in name order)."""
    return merge((e for name in sorted(slices) for e in slice_endpoints(slices[name])), port_order)


def merge_endpoints_objects(objects: Mapping[str, Obj], port_order: Sequence[str] = ()) -> Endpoints:
    """The state of a Service from its core/v1 Endpoints object (a mapping of at most one name)."""
    return merge((e for name in sorted(objects) for e in endpoints_object_endpoints(objects[name])),
                 port_order)


def service_port_names(service: Obj | None) -> list[str]:
    """The Service's port names in spec order (slices carry the same names), for the default port."""
    if not service:
        return []
    return [p.get("name") or "" for p in (service.get("spec") or {}).get("ports") or ()]
