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
from lookaside_grpc._resolvers import Query

E = lookaside_grpc.Endpoint


def test_public_api() -> None:
    names = (
        "channel",
        "Channel",
        "LookasideInterceptor",
        "intercepted_channel",
        "Watch",
        "PerCall",
        "Settings",
        "ClientOptions",
        "Target",
        "InvalidTarget",
        "RoutingPolicy",
        "RoundRobin",
        "Random",
        "LeastRequest",
        "PeakEwma",
        "Weighted",
        "Endpoint",
        "Mode",
        "Stats",
        "stats",
        "__version__",
    )
    for name in names:
        assert name in lookaside_grpc.__all__ and hasattr(lookaside_grpc, name), name
    for name in (
        "channel",
        "Channel",
        "LookasideInterceptor",
        "interceptors",
        "Target",
        "InvalidTarget",
        "Watch",
        "PerCall",
    ):
        assert name in lookaside_grpc.aio.__all__ and hasattr(lookaside_grpc.aio, name), name
    assert lookaside_grpc.aio.Target is lookaside_grpc.Target
    assert lookaside_grpc.aio.channel is not lookaside_grpc.channel
    assert issubclass(lookaside_grpc.Channel, grpc.Channel)
    assert lookaside_grpc.WATCH == "watch" and lookaside_grpc.PER_CALL == "per_call"


def test_one_option_set_for_every_flavour() -> None:
    """Every flavour takes exactly the ClientOptions (plus its own few): an option of one is accepted by
    all, and a knob a mode does not use is not accepted at all."""
    import inspect

    shared = set(lookaside_grpc.ClientOptions.__annotations__)
    creds = grpc.ssl_channel_credentials()
    opts = dict(
        policy="random",
        credentials=creds,
        options=[("grpc.max_receive_message_length", 1 << 24)],
        lookaside_credentials=None,
        tls_server_name="greet.internal",
        max_staleness=60.0,
        lookaside_keepalive=30.0,
        mode=lookaside_grpc.PerCall(batch=2, pick_cache_ttl=0.5),
        retry_budget=lookaside_grpc.RetryBudget(ratio=0.1),
        slow_start=5.0,
        zone="a",
        hash_key=None,  # policy="ring_hash" only: tests/test_ring_hash.py
    )
    assert set(opts) == shared
    la = "127.0.0.1:1"
    with lookaside_grpc.channel("greet.default", lookaside=la, **opts) as ch:  # type: ignore[arg-type]
        assert ch.settings.tls_server_name == "greet.internal"
    with lookaside_grpc.LookasideInterceptor(la, {"greet.GreetService": "greet.default"}, **opts) as i:  # type: ignore[arg-type]
        assert i.routes == {"greet.GreetService": lookaside_grpc.Target("greet", "default")}
    lookaside_grpc.aio.LookasideInterceptor(la, {}, **opts)  # type: ignore[arg-type]
    for factory in (lookaside_grpc.channel, lookaside_grpc.aio.channel):
        params = set(inspect.signature(factory).parameters)
        assert params == {"target", "namespace", "port", "lookaside", "init_timeout", "options"}
        with pytest.raises(TypeError):
            factory("greet.default", lookaside=la, batch=4)  # type: ignore[call-arg]
    for cls in (lookaside_grpc.LookasideInterceptor, lookaside_grpc.aio.LookasideInterceptor):
        with pytest.raises(TypeError):
            cls(la, {}, batch=4)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        lookaside_grpc.Watch(batch=4)  # type: ignore[call-arg]


def test_settings_are_the_sharing_key() -> None:
    la = "127.0.0.1:1"
    a = lookaside_grpc.channel("greet", namespace="default", lookaside=la)
    b = lookaside_grpc.channel("greet.default", lookaside=la, mode=lookaside_grpc.Watch())
    c = lookaside_grpc.channel("greet.default", lookaside=la, mode="per_call")
    try:
        assert a.settings == b.settings and a._balancer is b._balancer
        assert c.settings != a.settings and c._balancer is not a._balancer
        assert c.mode == lookaside_grpc.PerCall()
    finally:
        for ch in (a, b, c):
            ch.close()


def test_lookaside_addr_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKASIDE_ADDR", "lookaside.example:7000")
    with lookaside_grpc.channel("greet.default") as ch:
        assert ch.settings.lookaside == "lookaside.example:7000"
    monkeypatch.delenv("LOOKASIDE_ADDR")
    with lookaside_grpc.channel("greet.default") as ch:
        assert ch.settings.lookaside == "127.0.0.1:50055"


def test_library_logger_has_a_null_handler_and_a_version() -> None:
    import logging

    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("lookaside_grpc").handlers)
    assert lookaside_grpc.__version__ and lookaside_grpc.__version__[0].isdigit()


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
    t = Query(lookaside_grpc.Target("greet", "default", "grpc"), "la:1", batch=4)
    assert str(t) == "greet.default:grpc"
    r = t.resolve_request(protocol.ROUNDROBIN)
    assert (r.service, r.namespace, r.port, r.count, r.router) == ("greet", "default", "grpc", 4, 1)
    w = t.watch_request()
    assert (w.service, w.namespace, w.port) == ("greet", "default", "grpc")
    resp = protocol.Response(endpoints=[protocol.Endpoint(ip="1.1.1.1", port=5)], address="1.1.1.1", port=5)
    assert t.endpoints_from_response(resp) == [E("1.1.1.1", 5)]
    t2 = Query(lookaside_grpc.Target("greet", "default", 50051), "la:1")
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
        lookaside_grpc.PerCall(batch=0)
    with pytest.raises(ValueError):
        lookaside_grpc.PerCall(pick_cache_ttl=-1)
    with pytest.raises(lookaside_grpc.InvalidTarget):
        lookaside_grpc.channel("")
    with pytest.raises(lookaside_grpc.InvalidTarget):
        lookaside_grpc.channel("Greet.default")
    with pytest.raises(ValueError):
        lookaside_grpc.channel("greet.default", namespace="prod")
    with pytest.raises(ValueError):
        lookaside_grpc.channel("greet", policy="least_loaded")
    with pytest.raises(ValueError):
        lookaside_grpc.channel("greet", max_staleness=0)


def test_one_timer_thread_for_every_cool_down() -> None:
    """2,000 ejections are heap entries on one timer thread, not a thread each; closing cancels them."""
    from lookaside_grpc import _timers
    from lookaside_grpc._health import Ejector
    from lookaside_grpc._stats import Counters

    before = threading.active_count()
    changes: list[frozenset[str]] = []
    ejector = Ejector(lambda: 10_000, changes.append, Counters(), base=60.0)
    for i in range(2000):
        assert ejector.eject(f"10.0.{i // 250}.{i % 250}:1")
    assert len(ejector.ejected) == 2000 and _timers.pending() >= 2000
    assert threading.active_count() <= before + 1  # at most the one timer thread
    ejector.close()
    assert _timers.pending() < 2000


def test_timers_run_in_order_and_can_be_cancelled() -> None:
    from lookaside_grpc import _timers

    done = threading.Event()
    ran: list[str] = []
    _timers.call_later(0.02, lambda: ran.append("b"))
    _timers.call_later(0.01, lambda: ran.append("a"))
    _timers.call_later(0.0, lambda: ran.append("x")).cancel()
    _timers.call_later(0.03, done.set)
    assert done.wait(5)
    assert ran == ["a", "b"]


def test_lookaside_channel_keepalive_and_the_liveness_window() -> None:
    """The lookaside channel pings (grpcio times pings out by ``grpc.http2.ping_timeout_ms``); a Watch
    broken by an unanswered ping counts the set from the last moment the lookaside was known alive."""
    from lookaside_grpc._resolvers import _silent
    from lookaside_grpc._settings import make_settings

    s = make_settings(lookaside_grpc.Target("greet", "default"), None, {"lookaside_keepalive": 5.0})
    opts = dict(s.lookaside_options())
    assert opts["grpc.keepalive_time_ms"] == 5000 and opts["grpc.http2.ping_timeout_ms"] == 5000
    assert s.liveness_window() == 10.0
    off = make_settings(lookaside_grpc.Target("greet", "default"), None, {"lookaside_keepalive": None})
    assert "grpc.keepalive_time_ms" not in dict(off.lookaside_options()) and off.liveness_window() == 0
    assert _silent(PickError(grpc.StatusCode.UNAVAILABLE, "Stream removed (ping timeout)"))
    assert not _silent(PickError(grpc.StatusCode.UNAVAILABLE, "Connection refused"))


def test_target_spellings() -> None:
    from lookaside_grpc._settings import make_target

    t = lookaside_grpc.Target("greet", "prod", "grpc")
    for spelling in ("greet.prod:grpc", "greet.prod.svc:grpc", "greet.prod.svc.cluster.local:grpc", t):
        assert make_target(spelling, None, None) == t
    assert make_target("greet", "prod", "grpc") == t
    assert make_target("greet.prod", None, 50051) == lookaside_grpc.Target("greet", "prod", 50051)
    assert make_target("greet", None, None) == lookaside_grpc.Target("greet", "default")
    with pytest.raises(ValueError):
        make_target("greet.prod:grpc", None, 50051)
