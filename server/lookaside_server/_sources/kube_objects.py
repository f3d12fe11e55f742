"""Pure conversion of Kubernetes objects (raw JSON dicts, camelCase) to :class:`BackendEndpoint` tuples.

* discovery.k8s.io/v1 EndpointSlices: every slice of a Service is merged (keyed by slice name by the
  caller); endpoint x port is flattened; conditions follow the API defaults (``ready`` unset = ready,
  ``serving`` unset = ``ready``, ``terminating`` unset = false); an address present in two slices
  (transiently, while the controller moves it) is kept once, with its best conditions; IPv4 and IPv6
  slices are used, FQDN slices ignored; only TCP ports with a number count.
* core/v1 Endpoints (the fallback for old clusters): ``subsets[].addresses`` x ``subsets[].ports``, all ready;
  ``notReadyAddresses`` are ignored.

A slice's port is the number to dial (the Service's *target* port, per pod); the Service port it belongs to
(``spec.ports[].port``, what clients ask for) is on the Service only: the conversions take the Service's port
numbers by port name (``numbers``, from the namespace watch, which knows the Service) and set each endpoint's
``service_port``; :func:`with_service_ports` sets them again when the Service's ports change.

The namespace watches keep no raw objects: each is converted on arrival to a compact form
(:func:`service_info` for a Service, :func:`slice_member` / :func:`endpoints_member` for the endpoint objects:
the owning Service and its endpoints) and Services are merged from those (:func:`merge_members`).

The result is sorted deterministically (Service port order, then address, then port) so that an
unchanged state compares equal whatever order the API returned the slices in, and the first endpoint
carries the Service's first port (the default port of a Resolve without ``port``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
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


_NO_NUMBERS: Mapping[str, int] = {}


def slice_endpoints(obj: Obj, numbers: Mapping[str, int] = _NO_NUMBERS) -> list[BackendEndpoint]:
    """The endpoints of one EndpointSlice (endpoint x TCP port), each with the Service port number of its
    port name from ``numbers`` (0 if none); FQDN slices give none."""
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
        for_zones = tuple(
            z["name"]
            for z in hints.get("forZones") or ()
            if isinstance(z, Mapping) and isinstance(z.get("name"), str)
        )
        zone = ep.get("zone") or ""
        for name, number in ports:
            out.append(
                BackendEndpoint(
                    ip=ip,
                    port=number,
                    port_name=name,
                    zone=zone,
                    for_zones=for_zones,
                    ready=ready,
                    serving=serving,
                    terminating=terminating,
                    service_port=numbers.get(name, 0),
                )
            )
    return out


def endpoints_object_endpoints(obj: Obj, numbers: Mapping[str, int] = _NO_NUMBERS) -> list[BackendEndpoint]:
    """The ready endpoints of a core/v1 Endpoints object (``notReadyAddresses`` ignored), with Service port
    numbers as :func:`slice_endpoints`."""
    out: list[BackendEndpoint] = []
    for subset in obj.get("subsets") or ():
        ports = _tcp_ports(subset.get("ports"))
        for address in subset.get("addresses") or ():
            ip = normalize_ip(address.get("ip"))
            if ip is None:
                continue
            out.extend(
                BackendEndpoint(ip=ip, port=number, port_name=name, service_port=numbers.get(name, 0))
                for name, number in ports
            )
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
    return merge(
        (e for name in sorted(objects) for e in endpoints_object_endpoints(objects[name])), port_order
    )


def with_service_ports(
    endpoints: tuple[BackendEndpoint, ...], numbers: Mapping[str, int]
) -> tuple[BackendEndpoint, ...]:
    """``endpoints`` with each one's ``service_port`` set from the Service's port of the same name (0 if the
    Service has none of that name, or is not known yet); the same tuple when nothing changes."""
    if all(e.service_port == numbers.get(e.port_name, 0) for e in endpoints):
        return endpoints
    return tuple(
        e if e.service_port == (n := numbers.get(e.port_name, 0)) else replace(e, service_port=n)
        for e in endpoints
    )


def service_port_names(service: Obj | None) -> list[str]:
    """The Service's port names in spec order (slices carry the same names), for the default port."""
    if not service:
        return []
    return [p.get("name") or "" for p in (service.get("spec") or {}).get("ports") or ()]


# -- compact forms kept per namespace watch (the raw objects are dropped as soon as they are converted) ---


@dataclass(frozen=True)
class ServicePort:
    """One ``spec.ports[]`` entry of a Service: its name, number, target port (number, name or None) and
    protocol."""

    name: str
    port: int
    target_port: int | str | None
    protocol: str = "TCP"


@dataclass(frozen=True)
class ServiceInfo:
    """What the source keeps of a Service: that it exists, and its ports in spec order."""

    ports: tuple[ServicePort, ...] = ()

    @property
    def port_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.ports)

    @cached_property
    def port_numbers(self) -> dict[str, int]:
        """Service port number by port name (an unnamed single port is named ""), as slices name ports."""
        return {p.name: p.port for p in self.ports}


def service_info(service: Obj) -> ServiceInfo:
    """The compact form of a Service object."""
    ports = []
    for p in (service.get("spec") or {}).get("ports") or ():
        number = p.get("port")
        if not isinstance(number, int) or isinstance(number, bool):
            continue
        target = p.get("targetPort")
        if not isinstance(target, int | str) or isinstance(target, bool):
            target = None
        ports.append(ServicePort(p.get("name") or "", number, target, p.get("protocol") or "TCP"))
    return ServiceInfo(tuple(ports))


def object_key(obj: Obj) -> tuple[str, str] | None:
    """``(namespace, name)`` of an object, None if it has no name."""
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    return (meta.get("namespace") or "", name)


#: The Service port numbers by port name of a Service (by name), as the namespace watch knows them.
NumbersOf = Callable[[str], Mapping[str, int]]


def _no_numbers(service: str) -> Mapping[str, int]:
    return _NO_NUMBERS


def slice_member(
    obj: Obj, numbers_of: NumbersOf = _no_numbers
) -> tuple[str, tuple[BackendEndpoint, ...]] | None:
    """The Service an EndpointSlice belongs to (its ``kubernetes.io/service-name`` label) and its endpoints
    (with that Service's port numbers from ``numbers_of``); None for a slice without that label (not managed
    for a Service)."""
    service = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not service:
        return None
    return service, tuple(slice_endpoints(obj, numbers_of(service)))


def endpoints_member(
    obj: Obj, numbers_of: NumbersOf = _no_numbers
) -> tuple[str, tuple[BackendEndpoint, ...]] | None:
    """The Service a core/v1 Endpoints object belongs to (the one of the same name) and its endpoints."""
    name = (obj.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        return None
    return name, tuple(endpoints_object_endpoints(obj, numbers_of(name)))


def merge_members(
    members: Mapping[str, Sequence[BackendEndpoint]], port_order: Sequence[str] = ()
) -> Endpoints:
    """The state of a Service from the converted endpoints of its objects (by object name, merged in name
    order: the same result as :func:`merge_slices` over the raw objects)."""
    return merge((e for name in sorted(members) for e in members[name]), port_order)
