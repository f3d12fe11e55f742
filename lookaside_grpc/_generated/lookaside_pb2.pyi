from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor
from google.protobuf import descriptor_pool as _descriptor_pool

POOL: _descriptor_pool.DescriptorPool

class Request(_message.Message):
    __slots__ = ("router", "service", "namespace", "port", "count")
    class RouterType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RANDOM: _ClassVar[Request.RouterType]
        ROUNDROBIN: _ClassVar[Request.RouterType]
        LEAST_REQUEST: _ClassVar[Request.RouterType]
        PEAK_EWMA: _ClassVar[Request.RouterType]
        WEIGHTED: _ClassVar[Request.RouterType]
    RANDOM: Request.RouterType
    ROUNDROBIN: Request.RouterType
    LEAST_REQUEST: Request.RouterType
    PEAK_EWMA: Request.RouterType
    WEIGHTED: Request.RouterType
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
    __slots__ = ("ip", "port", "zone", "for_zones", "port_name", "weight")
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    FOR_ZONES_FIELD_NUMBER: _ClassVar[int]
    PORT_NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ip: str
    port: int
    zone: str
    for_zones: _containers.RepeatedScalarFieldContainer[str]
    port_name: str
    weight: int
    def __init__(self, ip: _Optional[str] = ..., port: _Optional[int] = ..., zone: _Optional[str] = ..., for_zones: _Optional[_Iterable[str]] = ..., port_name: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

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

class StatusRequest(_message.Message):
    __slots__ = ("service", "namespace")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    service: str
    namespace: str
    def __init__(self, service: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("targets", "server_version", "source", "generated_at")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[TargetStatus]
    server_version: str
    source: str
    generated_at: float
    def __init__(self, targets: _Optional[_Iterable[_Union[TargetStatus, _Mapping]]] = ..., server_version: _Optional[str] = ..., source: _Optional[str] = ..., generated_at: _Optional[float] = ...) -> None: ...

class TargetStatus(_message.Message):
    __slots__ = ("service", "namespace", "version", "endpoints", "changed_at", "watchers", "source", "exists")
    class SourceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    WATCHERS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    service: str
    namespace: str
    version: int
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointStatus]
    changed_at: float
    watchers: int
    source: _containers.ScalarMap[str, str]
    exists: bool
    def __init__(self, service: _Optional[str] = ..., namespace: _Optional[str] = ..., version: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[EndpointStatus, _Mapping]]] = ..., changed_at: _Optional[float] = ..., watchers: _Optional[int] = ..., source: _Optional[_Mapping[str, str]] = ..., exists: bool = ...) -> None: ...

class EndpointStatus(_message.Message):
    __slots__ = ("ip", "port", "port_name", "zone", "for_zones", "ready", "serving", "terminating")
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PORT_NAME_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    FOR_ZONES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    TERMINATING_FIELD_NUMBER: _ClassVar[int]
    ip: str
    port: int
    port_name: str
    zone: str
    for_zones: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    serving: bool
    terminating: bool
    def __init__(self, ip: _Optional[str] = ..., port: _Optional[int] = ..., port_name: _Optional[str] = ..., zone: _Optional[str] = ..., for_zones: _Optional[_Iterable[str]] = ..., ready: bool = ..., serving: bool = ..., terminating: bool = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("service", "namespace", "port", "client_id", "interval_ms", "endpoints")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    service: str
    namespace: str
    port: str
    client_id: str
    interval_ms: int
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointLoad]
    def __init__(self, service: _Optional[str] = ..., namespace: _Optional[str] = ..., port: _Optional[str] = ..., client_id: _Optional[str] = ..., interval_ms: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[EndpointLoad, _Mapping]]] = ...) -> None: ...

class EndpointLoad(_message.Message):
    __slots__ = ("ip", "port", "outstanding", "latency_ms", "calls")
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ip: str
    port: int
    outstanding: int
    latency_ms: float
    calls: int
    def __init__(self, ip: _Optional[str] = ..., port: _Optional[int] = ..., outstanding: _Optional[int] = ..., latency_ms: _Optional[float] = ..., calls: _Optional[int] = ...) -> None: ...

class LoadReportAck(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...
