"""Unit tests of the client building blocks: endpoints, policies, the pool, request building."""

from __future__ import annotations

import threading

import grpc
import pytest

import lookaside_grpc
import lookaside_grpc.aio
from lookaside_grpc import protocol
from lookaside_grpc._endpoints import EndpointState
from lookaside_grpc._errors import FailedCall, PickError, from_lookaside_error
from lookaside_grpc._policies import resolve_policy
from lookaside_grpc._pool import ChannelPool
from lookaside_grpc._resolvers import Target

E = lookaside_grpc.Endpoint


def test_public_api() -> None:
    for name in ("channel", "Channel", "RoutingPolicy", "RoundRobin", "Random", "Endpoint", "Mode", "WATCH"):
        assert name in lookaside_grpc.__all__ and hasattr(lookaside_grpc, name)
    assert lookaside_grpc.aio.channel is not lookaside_grpc.channel
    assert issubclass(lookaside_grpc.Channel, grpc.Channel)
    assert lookaside_grpc.WATCH == "watch" and lookaside_grpc.PER_CALL == "per_call"


def test_endpoint_address_formats_ipv6_with_brackets() -> None:
    assert E("10.0.0.1", 50051).address == "10.0.0.1:50051"
    assert E("fd00::1", 50051, "zone-a").address == "[fd00::1]:50051"
    assert E("10.0.0.1", 1, "a") == E("10.0.0.1", 1, "a") and hash(E("10.0.0.1", 1)) == hash(E("10.0.0.1", 1))
    pb = protocol.Endpoint(ip="::1", port=7, zone="z")
    assert E.from_proto(pb) == E("::1", 7, "z")
    with pytest.raises(AttributeError):
        E("1.2.3.4", 1).ip = "x"  # type: ignore[misc]


def test_endpoint_state_reports_added_and_removed() -> None:
    state = EndpointState()
    assert not state.received
    added, removed = state.update([E("a", 1), E("b", 1), E("a", 1)], 1)
    assert state.endpoints == (E("a", 1), E("b", 1)) and added == {"a:1", "b:1"} and not removed
    added, removed = state.update([E("b", 1), E("c", 1)], 2)
    assert added == {"c:1"} and removed == {"a:1"} and state.version == 2 and state.received


def test_round_robin_is_exact_and_thread_safe() -> None:
    eps = [E("a", 1), E("b", 1), E("c", 1)]
    rr = lookaside_grpc.RoundRobin()
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def work() -> None:
        local = [rr.pick(eps).ip for _ in range(3000)]
        with lock:
            for ip in local:
                counts[ip] = counts.get(ip, 0) + 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert counts == {"a": 4000, "b": 4000, "c": 4000}


def test_policies_by_name_and_custom() -> None:
    assert isinstance(resolve_policy("round_robin"), lookaside_grpc.RoundRobin)
    rnd = resolve_policy("random")
    assert isinstance(rnd, lookaside_grpc.Random) and rnd.router_type == protocol.RANDOM
    eps = [E("a", 1), E("b", 1)]
    assert {rnd.pick(eps).ip for _ in range(200)} == {"a", "b"}
    with pytest.raises(ValueError):
        resolve_policy("least_loaded")
    assert isinstance(resolve_policy("least_request"), lookaside_grpc.LeastRequest)

    class First(lookaside_grpc.RoutingPolicy):
        def pick(self, endpoints):  # type: ignore[no-untyped-def]
            return endpoints[0]

    p = First()
    assert resolve_policy(p) is p and p.pick(eps).ip == "a"


class FakeChannel:
    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = 0


def test_pool_reuses_and_retires_after_in_flight_calls() -> None:
    closed: list[FakeChannel] = []

    def closer(ch: FakeChannel) -> None:
        ch.closed += 1
        closed.append(ch)

    pool: ChannelPool[FakeChannel] = ChannelPool(FakeChannel, closer)
    a = pool.get("a:1")
    assert pool.get("a:1") is a and a.channel.address == "a:1"
    idle = pool.get("b:1")
    assert a.acquire() and a.acquire()
    pool.retire(["a:1", "b:1", "unknown:1"])
    assert idle.closed and closed == [idle.channel]
    assert a.retired and not a.closed and pool.addresses() == set()
    a.release()
    assert not a.closed
    a.release()
    assert a.closed and a.channel.closed == 1
    assert not a.acquire()  # a closed slot refuses calls: the caller binds a fresh one
    fresh = pool.get("a:1")
    assert fresh is not a and fresh.acquire()
    assert pool.close() == [fresh.channel]
    with pytest.raises(ValueError):
        pool.get("c:1")


def test_target_requests_and_original_style_responses() -> None:
    t = Target("greet", "default", "grpc", "la:1", batch=4)
    assert str(t) == "greet.default:grpc"
    r = t.resolve_request(protocol.ROUNDROBIN)
    assert (r.service, r.namespace, r.port, r.count, r.router) == ("greet", "default", "grpc", 4, 1)
    w = t.watch_request()
    assert (w.service, w.namespace, w.port) == ("greet", "default", "grpc")
    resp = protocol.Response(endpoints=[protocol.Endpoint(ip="1.1.1.1", port=5)], address="1.1.1.1", port=5)
    assert t.endpoints_from_response(resp) == [E("1.1.1.1", 5)]
    t2 = Target("greet", "default", "50051", "la:1")
    assert t2.endpoints_from_response(protocol.Response(address="2.2.2.2")) == [E("2.2.2.2", 50051)]
    assert t.endpoints_from_response(protocol.Response()) == []


def test_failed_call_is_an_rpc_error_future_and_iterator() -> None:
    err = FailedCall(PickError(grpc.StatusCode.UNAVAILABLE, "nope"))
    assert isinstance(err, grpc.RpcError) and isinstance(err, grpc.Future) and isinstance(err, grpc.Call)
    assert err.code() is grpc.StatusCode.UNAVAILABLE and err.details() == "nope" and err.done()
    assert err.exception() is err
    with pytest.raises(grpc.RpcError):
        err.result()
    with pytest.raises(grpc.RpcError):
        next(iter(err))
    seen: list[object] = []
    err.add_done_callback(seen.append)
    assert seen == [err]
    assert from_lookaside_error(err, "greet.default", "la:1").code is grpc.StatusCode.UNAVAILABLE
    nf = FailedCall(PickError(grpc.StatusCode.NOT_FOUND, "gone"))
    assert from_lookaside_error(nf, "greet.default", "la:1").code is grpc.StatusCode.NOT_FOUND


def test_factory_validates_arguments() -> None:
    with pytest.raises(ValueError):
        lookaside_grpc.channel("greet", mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        lookaside_grpc.channel("greet", mode="per_call", batch=0)
    with pytest.raises(ValueError):
        lookaside_grpc.channel("")
