from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Request(_message.Message):
    __slots__ = ("router", "service", "namespace", "port", "count")
    class RouterType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RANDOM: _ClassVar[Request.RouterType]
        ROUNDROBIN: _ClassVar[Request.RouterType]
    RANDOM: Request.RouterType
    ROUNDROBIN: Request.RouterType
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    router: Request.RouterType
    service: str
    namespace: str
    port: str
    count: int
    def __init__(self, router: _Optional[_Union[Request.RouterType, str]] = ..., service: _Optional[str] = ..., namespace: _Optional[str] = ..., port: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class Response(_message.Message):
    __slots__ = ("address", "port", "endpoints", "version")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    version: int
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("ip", "port", "zone", "for_zones", "port_name")
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    FOR_ZONES_FIELD_NUMBER: _ClassVar[int]
    PORT_NAME_FIELD_NUMBER: _ClassVar[int]
    ip: str
    port: int
    zone: str
    for_zones: _containers.RepeatedScalarFieldContainer[str]
    port_name: str
    def __init__(self, ip: _Optional[str] = ..., port: _Optional[int] = ..., zone: _Optional[str] = ..., for_zones: _Optional[_Iterable[str]] = ..., port_name: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("service", "namespace", "port")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    service: str
    namespace: str
    port: str
    def __init__(self, service: _Optional[str] = ..., namespace: _Optional[str] = ..., port: _Optional[str] = ...) -> None: ...

class EndpointSet(_message.Message):
    __slots__ = ("service", "namespace", "endpoints", "version")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    service: str
    namespace: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    version: int
    def __init__(self, service: _Optional[str] = ..., namespace: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...
