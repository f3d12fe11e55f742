"""``ring_hash``: consistent hashing on a call metadata value. The same key reaches the same backend from
independent clients of every flavour, and from a stock grpc channel with grpc's own ``ring_hash`` (control);
one of N backends leaving moves about 1/N of the keys; keys spread evenly; calls without the key succeed;
a backend refusing connections sends its keys to the next ring entry (retry and ejection) and no other key
moves; bad options are clear errors. Real Greet servers on 127.0.0.1 behind a fake lookaside."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest

import lookaside_grpc
import lookaside_grpc.aio
from examples.greet import greet_pb2_grpc
from lookaside_dev.backends import greet_backend_of
from lookaside_dev.fakes import Backends, RunningLookaside, req, unused_address, wait_until
from lookaside_grpc._endpoints import Endpoint
from lookaside_grpc._policies import POLICIES, RoundRobin
from lookaside_grpc._ring_hash import (
    MAX_RING_SIZE,
    MIN_RING_SIZE,
    RingHash,
    build_ring,
    request_hash,
    xxh64,
)

KEY = "x-user-id"
ROUTES = {"greet.GreetService": "greet.default"}
USERS = [f"user-{i}" for i in range(1000)]


def eps(n: int, weights: list[int] | None = None) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"10.0.0.{i + 1}", 8080, weight=weights[i] if weights else 0) for i in range(n))


def owner(policy: RingHash, endpoints: tuple[Endpoint, ...], user: str) -> str:
    return policy.pick_hashed(endpoints, request_hash(((KEY, user),), KEY)).address


# --- XXH64, the request hash and the ring ------------------------------------------------------------------


def test_xxh64_matches_the_reference_vectors() -> None:
    assert xxh64(b"") == 0xEF46DB3751D8E999
    assert xxh64(b"a") == 0xD24EC4F1A98C6E5B
    assert xxh64(b"abc") == 0x44BC2CF5AD770999
    assert xxh64(b"Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1  # the 32-byte stripes
    assert xxh64(b"", seed=1) != xxh64(b"")


def test_request_hash_reads_the_key_as_grpc_does() -> None:
    h = xxh64(b"u1")
    assert request_hash(((KEY, "u1"),), KEY) == h
    assert request_hash(((KEY, b"u1"),), KEY) == h
    assert request_hash((("other", "x"), (KEY, "u1")), KEY) == h
    assert request_hash(grpc.aio.Metadata((KEY, "u1")), KEY) == h
    # several values are joined with "," before hashing, as grpc's metadata lookup joins them
    assert request_hash(((KEY, "a"), ("z", "q"), (KEY, "b")), KEY) == xxh64(b"a,b")
    assert request_hash(None, KEY) is None
    assert request_hash((), KEY) is None
    assert request_hash((("x-user-idx", "u1"),), KEY) is None


def test_ring_is_a42s_equal_shares_and_weighted_shares() -> None:
    ring = build_ring(eps(3))
    assert len(ring.hashes) == 1026 and sorted(ring.share().values()) == [342, 342, 342]
    assert ring.hashes == sorted(ring.hashes)
    weighted = build_ring(eps(3, [2, 1, 1]))
    share = weighted.share()
    assert share["10.0.0.1:8080"] == 2 * share["10.0.0.2:8080"] == 2 * share["10.0.0.3:8080"] == 512
    assert len(build_ring(eps(500)).hashes) <= MAX_RING_SIZE  # scale capped by max_ring_size
    assert len(build_ring(eps(1)).hashes) == MIN_RING_SIZE
    with pytest.raises(ValueError, match="ring sizes"):
        RingHash(KEY, min_ring_size=10, max_ring_size=5)


def test_keys_spread_evenly() -> None:
    for n in (3, 5, 10):
        policy = RingHash(KEY)
        load = Counter(owner(policy, eps(n), u) for u in USERS)
        print(f"{n} endpoints, 1000 keys: {sorted(load.values())}")
        assert len(load) == n
        assert min(load.values()) >= 0.5 * 1000 / n and max(load.values()) <= 1.6 * 1000 / n, load


@pytest.mark.parametrize("n", [3, 4, 5, 10])
def test_about_one_nth_of_the_keys_move_when_one_of_n_leaves(n: int) -> None:
    full, policy = eps(n), RingHash(KEY)
    before = {u: owner(policy, full, u) for u in USERS}
    gone = full[n // 2]
    after = {u: owner(policy, tuple(e for e in full if e != gone), u) for u in USERS}
    moved = sum(before[u] != after[u] for u in USERS) / len(USERS)
    print(f"{n} endpoints, one leaves: {moved:.3f} of 1000 keys moved (1/N = {1 / n:.3f})")
    assert 0.5 / n <= moved <= 2 / n
    assert all(after[u] != gone.address for u in USERS)


@pytest.mark.parametrize("n", [3, 4, 5, 10])
def test_with_fixed_entries_per_endpoint_only_the_leaving_endpoints_keys_move(n: int) -> None:
    """entries_per_endpoint: a ring of this library's own where a leaving endpoint takes only its entries,
    so exactly its keys (about 1/N) move and every other key stays; spread stays even."""
    full, policy = eps(n), RingHash(KEY, entries_per_endpoint=256)
    before = {u: owner(policy, full, u) for u in USERS}
    gone = full[n // 2]
    after = {u: owner(policy, tuple(e for e in full if e != gone), u) for u in USERS}
    moved = [u for u in USERS if before[u] != after[u]]
    print(f"{n} endpoints, entries_per_endpoint=256, one leaves: {len(moved) / len(USERS):.3f} moved (1/N)")
    assert set(moved) == {u for u in USERS if before[u] == gone.address}
    assert 0.5 / n <= len(moved) / len(USERS) <= 1.5 / n
    load = Counter(before.values())
    assert min(load.values()) >= 0.5 * 1000 / n and max(load.values()) <= 1.6 * 1000 / n, load
    with pytest.raises(ValueError, match="entries_per_endpoint"):
        RingHash(KEY, entries_per_endpoint=0)


def test_an_ejected_endpoint_is_walked_past_and_no_other_key_moves() -> None:
    full, policy = eps(5), RingHash(KEY)
    policy.follow(lambda: full)  # the balancer's whole set; a pick is given the eligible ones
    before = {u: owner(policy, full, u) for u in USERS}
    eligible = full[:2] + full[3:]
    after = {u: owner(policy, eligible, u) for u in USERS}
    ejected = full[2].address
    assert all(after[u] == before[u] for u in USERS if before[u] != ejected)
    assert all(after[u] != ejected for u in USERS)
    # the ejected endpoint's keys go to the next ring entry of another endpoint (A42's failover)
    ring = policy.ring(full)
    for u in [u for u in USERS if before[u] == ejected][:50]:
        i = ring.index(request_hash(((KEY, u),), KEY) or 0)
        nxt = next(e.address for e in ring.owners[i:] + ring.owners[:i] if e.address != ejected)
        assert after[u] == nxt


def test_a_call_without_the_key_gets_a_random_ring_position() -> None:
    policy = RingHash(KEY, seed=7)
    load = Counter(policy.pick(eps(3)).address for _ in range(3000))
    assert len(load) == 3 and min(load.values()) > 700, load


# --- options -----------------------------------------------------------------------------------------------


def test_ring_hash_is_a_registered_policy_name() -> None:
    assert POLICIES["ring_hash"] is RingHash
    with lookaside_grpc.channel("greet", lookaside=unused_address(), policy="ring_hash", hash_key=KEY) as ch:
        assert ch.settings.hash_key == KEY and isinstance(ch.policy, RingHash) and ch.policy.hash_key == KEY


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"policy": "ring_hash"}, ValueError, "needs hash_key"),
        ({"policy": "round_robin", "hash_key": KEY}, ValueError, "ring_hash' only"),
        ({"hash_key": KEY}, ValueError, "ring_hash' only"),
        ({"policy": "ring_hash", "hash_key": 5}, TypeError, "metadata key string"),
        ({"policy": "ring_hash", "hash_key": "X-User-Id"}, ValueError, "lowercase"),
        ({"policy": "ring_hash", "hash_key": ""}, ValueError, "lowercase"),
        ({"policy": "ring_hash", "hash_key": "x-user-bin"}, ValueError, "binary"),
        ({"policy": "ring_hash", "hash_key": "grpc-timeout"}, ValueError, "reserved"),
        ({"policy": "ring_hash", "hash_key": KEY, "mode": "per_call"}, ValueError, "needs mode='watch'"),
        ({"policy": "ring_hash", "hash_key": KEY, "slow_start": True}, ValueError, "slow_start"),
        ({"policy": "ring_hash", "hash_key": KEY, "zone": "a"}, ValueError, "zone"),
    ],
)
async def test_bad_options_are_clear_errors_in_every_flavour(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    la = unused_address()
    with pytest.raises(error, match=match):
        lookaside_grpc.channel("greet", lookaside=la, **options)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        lookaside_grpc.aio.channel("greet", lookaside=la, **options)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        lookaside_grpc.LookasideInterceptor(la, ROUTES, **options)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        lookaside_grpc.aio.interceptors(la, ROUTES, **options)  # type: ignore[arg-type]


def test_hash_key_is_refused_in_xds_mode_and_the_env_zone_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="hash_key"):
        lookaside_grpc.channel("greet", lookaside=unused_address(), mode="xds", hash_key=KEY)
    monkeypatch.setenv("LOOKASIDE_ZONE", "zone-a")  # set for the process's other channels
    with lookaside_grpc.channel("greet", lookaside=unused_address(), policy="ring_hash", hash_key=KEY) as ch:
        assert ch.settings.zone == "" and ch._balancer._zone is None


def test_other_policies_never_read_the_call_metadata() -> None:
    class Untouchable(tuple[tuple[str, str], ...]):
        def __iter__(self) -> Iterator[tuple[str, str]]:
            raise AssertionError("metadata read")

    metadata = Untouchable(((KEY, "u1"),))
    with Backends(2) as b, RunningLookaside(b.addresses) as la:
        with lookaside_grpc.channel("greet", lookaside=la.address) as ch:
            greet_pb2_grpc.GreetServiceStub(ch).Greet(req(), timeout=5)
            resolver = ch._balancer.resolver
            assert resolver.pick_nowait(RoundRobin(), metadata) is not None
            with pytest.raises(AssertionError, match="metadata read"):  # a hashing policy does read it
                resolver.pick_nowait(RingHash(KEY), metadata)


# --- real backends ----------------------------------------------------------------------------------------


def _sync_owners(ch: grpc.Channel, users: list[str]) -> dict[str, str]:
    stub = greet_pb2_grpc.GreetServiceStub(ch)
    return {u: greet_backend_of(stub.Greet(req(), timeout=5, metadata=((KEY, u),)).result) for u in users}


async def _aio_owners(ch: grpc.aio.Channel, users: list[str]) -> dict[str, str]:
    stub = greet_pb2_grpc.GreetServiceStub(ch)
    out = {}
    for u in users:
        out[u] = greet_backend_of((await stub.Greet(req(), timeout=5, metadata=((KEY, u),))).result)
    return out


def _stock_ring_hash(addresses: list[str]) -> grpc.Channel:
    """grpc's own ring_hash over ``addresses`` (gRFC A76's requestHashHeader: the same XXH64 of the header
    and the same ring as xDS RING_HASH with a header hash policy)."""
    config = {"loadBalancingConfig": [{"ring_hash_experimental": {"requestHashHeader": KEY}}]}
    return grpc.insecure_channel(
        "ipv4:" + ",".join(addresses), options=[("grpc.service_config", json.dumps(config))]
    )


async def test_the_same_key_reaches_the_same_backend_from_every_client_and_from_grpcs_own_ring_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY", "true")  # grpcio's A76 flag
    users = USERS[:150]
    opts = {"policy": "ring_hash", "hash_key": KEY}
    with Backends(3) as b, Backends(1) as orig, RunningLookaside(b.addresses) as la:
        with lookaside_grpc.channel("greet", lookaside=la.address, **opts) as one:  # type: ignore[arg-type]
            first = _sync_owners(one, users)
            assert first == _sync_owners(one, users)  # sticky
        with lookaside_grpc.intercepted_channel(
            orig.addresses[0], ROUTES, lookaside=la.address, **opts
        ) as two:  # type: ignore[arg-type]
            assert _sync_owners(two, users) == first
        plain = grpc.insecure_channel(orig.addresses[0])
        with lookaside_grpc.LookasideInterceptor(la.address, ROUTES, **opts) as icpt:  # type: ignore[arg-type]
            assert _sync_owners(grpc.intercept_channel(plain, icpt), users[:50]) == {
                u: first[u] for u in users[:50]
            }
        plain.close()
        async with lookaside_grpc.aio.channel("greet", lookaside=la.address, **opts) as three:  # type: ignore[arg-type]
            assert await _aio_owners(three, users) == first
        aio_icpt = lookaside_grpc.aio.LookasideInterceptor(la.address, ROUTES, **opts)  # type: ignore[arg-type]
        async with grpc.aio.insecure_channel(orig.addresses[0], interceptors=aio_icpt.interceptors) as four:
            assert await _aio_owners(four, users) == first
        await aio_icpt.close()
        stock = _stock_ring_hash(b.addresses)
        assert _sync_owners(stock, users) == first  # grpc C-core's ring_hash agrees on every key
        stock.close()
        assert orig.calls() == [0]
    spread = Counter(first.values())
    print(f"150 keys over 3 backends: {sorted(spread.values())}")
    assert len(spread) == 3


async def test_every_call_shape_sends_the_key_to_its_backend() -> None:
    users = USERS[:20]
    opts = {"policy": "ring_hash", "hash_key": KEY}
    with Backends(3) as b, RunningLookaside(b.addresses) as la:
        with lookaside_grpc.channel("greet", lookaside=la.address, **opts) as ch:  # type: ignore[arg-type]
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            expected = _sync_owners(ch, users)
            for u in users:
                md = ((KEY, u),)
                assert (
                    greet_backend_of(stub.Greet.future(req(), timeout=5, metadata=md).result().result)
                    == expected[u]
                )
                streamed = {
                    greet_backend_of(r.result) for r in stub.GreetManyTimes(req(), timeout=5, metadata=md)
                }
                assert streamed == {expected[u]}
                assert (
                    greet_backend_of(stub.LongGreet(iter([req()]), timeout=5, metadata=md).result)
                    == expected[u]
                )
        async with lookaside_grpc.aio.channel("greet", lookaside=la.address, **opts) as ach:  # type: ignore[arg-type]
            astub = greet_pb2_grpc.GreetServiceStub(ach)
            for u in users:
                md = ((KEY, u),)
                got = {
                    greet_backend_of(r.result)
                    async for r in astub.GreetManyTimes(req(), timeout=5, metadata=md)
                }
                assert got == {expected[u]}


def test_one_of_four_backends_leaving_moves_about_a_quarter_of_1000_keys() -> None:
    with Backends(4) as b, RunningLookaside(b.addresses) as la:
        with lookaside_grpc.channel("greet", lookaside=la.address, policy="ring_hash", hash_key=KEY) as ch:
            before = _sync_owners(ch, USERS)
            gone = b.addresses[1]
            la.servicer.set_endpoints([a for a in b.addresses if a != gone])
            wait_until(lambda: gone not in ch._balancer.resolver.state.addresses(), 5)  # type: ignore[attr-defined]
            after = _sync_owners(ch, USERS)
    moved = sum(before[u] != after[u] for u in USERS) / len(USERS)
    lost = sum(before[u] == gone for u in USERS) / len(USERS)
    print(f"4 backends, one leaves: {moved:.3f} of 1000 keys moved ({lost:.3f} were on the one that left)")
    assert gone not in after.values()
    assert 0.5 / 4 <= moved <= 2 / 4


def test_calls_without_the_key_succeed_and_spread() -> None:
    with Backends(3) as b, RunningLookaside(b.addresses) as la:
        with lookaside_grpc.channel("greet", lookaside=la.address, policy="ring_hash", hash_key=KEY) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            load = Counter(greet_backend_of(stub.Greet(req(), timeout=5).result) for _ in range(300))
            load += Counter(
                greet_backend_of(stub.Greet(req(), timeout=5, metadata=(("other", "x"),)).result)
                for _ in range(300)
            )
    assert len(load) == 3 and min(load.values()) >= 100, load


async def test_aio_calls_without_the_key_succeed() -> None:
    with Backends(3) as b, RunningLookaside(b.addresses) as la:
        async with lookaside_grpc.aio.channel(
            "greet", lookaside=la.address, policy="ring_hash", hash_key=KEY
        ) as ch:
            stub = greet_pb2_grpc.GreetServiceStub(ch)
            load = Counter(
                [greet_backend_of((await stub.Greet(req(), timeout=5)).result) for _ in range(150)]
            )
    assert len(load) == 3, load


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_a_dead_backends_keys_go_to_their_next_ring_entry_and_no_other_key_moves(flavour: str) -> None:
    users = USERS[:300]
    with Backends(4) as b, RunningLookaside(b.addresses) as la:
        opts = {"policy": "ring_hash", "hash_key": KEY}
        if flavour == "sync":
            ch: object = lookaside_grpc.channel("greet", lookaside=la.address, **opts)  # type: ignore[arg-type]
        else:
            ch = lookaside_grpc.aio.channel("greet", lookaside=la.address, **opts)  # type: ignore[arg-type]

        async def owners() -> dict[str, str]:
            if isinstance(ch, grpc.aio.Channel):
                return await _aio_owners(ch, users)
            assert isinstance(ch, grpc.Channel)
            return _sync_owners(ch, users)

        before = await owners()
        dead = b.addresses[2]
        b.servers[2].stop(grace=None).wait(5)  # still in the lookaside's set: calls to it are refused
        after = await owners()  # none fails: the one retry takes the next ring entry
        policy = ch._balancer.policy  # type: ignore[attr-defined]
        full = ch._balancer.resolver.state.full  # type: ignore[attr-defined]
        ring = policy.ring(full)
        for u in users:
            if before[u] != dead:
                assert after[u] == before[u], u
                continue
            i = ring.index(request_hash(((KEY, u),), KEY) or 0)
            assert after[u] == next(e.address for e in ring.owners[i:] + ring.owners[:i] if e.address != dead)
        assert ch._balancer.stats().retries >= 1  # type: ignore[attr-defined]
        if isinstance(ch, grpc.aio.Channel):
            await ch.close()
        else:
            ch.close()  # type: ignore[attr-defined]
    assert sum(before[u] == dead for u in users) > 0


def test_the_benchmark_runs_end_to_end_at_a_tiny_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import ring_hash as bench

    monkeypatch.setenv("GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY", "true")  # restored afterwards
    res = bench.run(n=3, keys=60, calls=50, rounds=1)
    print(res)
    assert res["stickiness"] == 1.0 and res["stock_grpc_agrees"] == 1.0
    assert res["were_on_the_one_that_left"] <= res["moved_when_one_left"] <= 1.0
    assert sum(res["spread"]) == 60 and res["cpu_us_per_call"]["ring_hash"] > 0
    fixed = res["fixed_entries_moved"]
    assert fixed["moved"] == fixed["were_on_the_one_that_left"]  # on that ring only the leaver's keys move
