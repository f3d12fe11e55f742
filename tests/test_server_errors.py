"""Server error statuses: INVALID_ARGUMENT (with a BadRequest naming the field), NOT_FOUND, UNAVAILABLE."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from lookaside_dev.server_helpers import bad_field, endpoints, ports, serve
from lookaside_grpc import protocol as pb

DATA = {
    "default/greet": endpoints(2, port_name="grpc"),
    "default/down": endpoints(2, ready=False),
    "default/draining": [
        {"ip": "10.0.0.1", "port": 80, "ready": False, "serving": True, "terminating": True},
        {"ip": "10.0.0.2", "port": 80, "ready": False, "serving": False, "terminating": True},
        {"ip": "10.0.0.3", "port": 80, "ready": False, "serving": True, "terminating": True},
    ],
    "default/mixed": [
        {"ip": "10.0.0.1", "port": 80, "ready": False, "serving": True, "terminating": True},
        {"ip": "10.0.0.2", "port": 80},
    ],
    "default/empty": [],
}


async def _error(stub: pb.LookasideStub, **fields: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Resolve(pb.Request(**fields))
    return info.value


@pytest.mark.parametrize(
    ("service", "namespace", "field"),
    [
        ("", "default", "service"),
        ("greet", "", "namespace"),
        ("Greet", "default", "service"),
        ("greet", "Default", "namespace"),
        ("1greet", "default", "service"),  # RFC 1035: must start with a letter
        ("greet-", "default", "service"),
        ("gr_eet", "default", "service"),
        ("greet.x", "default", "service"),
        ("g" * 64, "default", "service"),
        ("greet", "n" * 64, "namespace"),
        ("greet", "-ns", "namespace"),
        ("greet", "ns/x", "namespace"),
    ],
)
async def test_invalid_names(tmp_path: Path, service: str, namespace: str, field: str) -> None:
    async with serve(tmp_path, DATA) as s:
        err = await _error(s.stub, router=pb.ROUNDROBIN, service=service, namespace=namespace)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_field(err) == field
        assert f"{service}.{namespace}" in err.details()
        # Watch validates the same way
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Watch(pb.WatchRequest(service=service, namespace=namespace)).read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_field(info.value) == field


async def test_valid_edge_names(tmp_path: Path) -> None:
    data = {f"{'1' + 'n' * 62}/{'g' * 63}": endpoints(1)}
    async with serve(tmp_path, data) as s:
        resp = await s.stub.Resolve(pb.Request(service="g" * 63, namespace="1" + "n" * 62))
        assert resp.port == 50051


async def test_unknown_router_value(tmp_path: Path) -> None:
    async with serve(tmp_path, DATA) as s:
        err = await _error(s.stub, router=7, service="greet", namespace="default")
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_field(err) == "router"
        assert "greet.default" in err.details()


async def test_count_too_large(tmp_path: Path) -> None:
    async with serve(tmp_path, DATA) as s:
        err = await _error(s.stub, service="greet", namespace="default", count=1001)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_field(err) == "count"
        assert "greet.default" in err.details()


async def test_unknown_port(tmp_path: Path) -> None:
    async with serve(tmp_path, DATA) as s:
        for port in ("http", "8080"):
            err = await _error(s.stub, service="greet", namespace="default", port=port)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad_field(err) == "port"
            assert repr(port) in err.details() and "greet.default" in err.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Watch(pb.WatchRequest(service="greet", namespace="default", port="http")).read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_field(info.value) == "port"


async def test_not_found(tmp_path: Path) -> None:
    async with serve(tmp_path, DATA) as s:
        for ns, svc in (("default", "nope"), ("other", "greet")):
            err = await _error(s.stub, service=svc, namespace=ns)
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert f"{svc}.{ns}" in err.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Watch(pb.WatchRequest(service="nope", namespace="default")).read()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("service", ["down", "empty"])
async def test_unavailable_when_nothing_eligible(tmp_path: Path, service: str) -> None:
    async with serve(tmp_path, DATA) as s:
        for router in (pb.RANDOM, pb.ROUNDROBIN):
            err = await _error(s.stub, router=router, service=service, namespace="default")
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert f"{service}.default" in err.details()


async def test_serving_terminating_fallback(tmp_path: Path) -> None:
    async with serve(tmp_path, DATA) as s:
        resp = await s.stub.Resolve(
            pb.Request(router=pb.ROUNDROBIN, service="draining", namespace="default", count=4)
        )
        # only serving-and-terminating ones, when none is ready
        assert [e.ip for e in resp.endpoints] == ["10.0.0.1", "10.0.0.3"] * 2
        # a ready endpoint always wins over terminating ones
        resp = await s.stub.Resolve(
            pb.Request(router=pb.ROUNDROBIN, service="mixed", namespace="default", count=3)
        )
        assert [e.ip for e in resp.endpoints] == ["10.0.0.2"] * 3
        assert ports(resp) == [80] * 3


@pytest.mark.parametrize("method", ["Resolve", "Watch"])
async def test_undecodable_request_is_invalid_argument(tmp_path: Path, method: str) -> None:
    """A body that is not a protobuf message is the caller's mistake: INVALID_ARGUMENT, and nothing lost."""
    async with serve(tmp_path, DATA) as s:
        path = f"/lookaside.Lookaside/{method}"
        garbage = b"\xff\xff\xff"  # field 31, wire type 7: not valid protobuf
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if method == "Resolve":
                await s.channel.unary_unary(path)(garbage)
            else:
                await s.channel.unary_stream(path)(garbage).read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message" in info.value.details()
        reply = await s.stub.Resolve(pb.Request(router=pb.ROUNDROBIN, service="greet", namespace="default"))
        assert reply.version == 1
