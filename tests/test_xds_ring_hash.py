"""Consistent hashing for stock ``xds:///`` clients: ``--xds-hash-header`` gives a target's Cluster
``RING_HASH`` (xxHash, as gRPC requires) and its route a ``hash_policy`` on that request header, so the same
header value reaches the same backend on every call and from every channel, and different values spread.
Control: without the flag the same calls rotate over every backend."""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Callable, Iterator

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from lookaside_dev.backends import Backend
from lookaside_dev.static_files import write_addresses
from lookaside_dev.xds_client import Driver
from lookaside_server import (
    RunningServer,
    Target,
)
from lookaside_server._cli.flags import build_parser, server_config
from lookaside_server._xds import parse_hash_headers
from lookaside_server._xds.resources import XdsOptions, cluster, listener, route_configuration

NAME = "greet.default"
HEADER = "x-user-id"


# --- resources and flags ----------------------------------------------------------------------------------


def test_cluster_and_route_with_a_hash_header() -> None:
    c = cluster(NAME, XdsOptions(), HEADER)
    assert c.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert c.ring_hash_lb_config.hash_function == cluster_pb2.Cluster.RingHashLbConfig.XX_HASH
    (policy,) = route_configuration(NAME, HEADER).virtual_hosts[0].routes[0].route.hash_policy
    assert policy.header.header_name == HEADER
    # the inline route of the Listener carries it too
    assert listener("greet.default.svc", XdsOptions(), NAME, HEADER) != listener(
        "greet.default.svc", XdsOptions(), NAME
    )
    # without a header: round robin, no hash policy (today's resources)
    assert cluster(NAME, XdsOptions()).lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert not route_configuration(NAME).virtual_hosts[0].routes[0].route.hash_policy


def test_hash_header_per_target_and_for_all() -> None:
    options = XdsOptions(hash_headers={"*": "x-all", "team/cart": "x-cart"})
    assert options.hash_header(Target("cart", "team")) == "x-cart"
    assert options.hash_header(Target("greet", "default", "grpc")) == "x-all"
    assert XdsOptions(hash_headers={"team/cart": "x-cart"}).hash_header(Target("greet", "default")) is None
    # a hashed target is never grouped for WRR: RING_HASH wins
    wrr = XdsOptions(lb_policy="wrr", hash_headers={"team/cart": "x-cart"})
    assert not wrr.grouped(Target("cart", "team")) and wrr.grouped(Target("greet", "default"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("x-user-id", {"*": "x-user-id"}),
        ("x-a,team/cart=x-b", {"*": "x-a", "team/cart": "x-b"}),
        (" team/cart = x-b ", {"team/cart": "x-b"}),
    ],
)
def test_parse_hash_headers(value: str, expected: dict[str, str]) -> None:
    assert parse_hash_headers([value]) == expected


@pytest.mark.parametrize(
    "value", ["X-User", "x-key-bin", "grpc-timeout", ":path", "team=x-a", "a/b/c=x", "x-a,x-b", "x y"]
)
def test_bad_hash_headers_are_usage_errors(value: str) -> None:
    with pytest.raises(ValueError, match="hash.header"):
        parse_hash_headers([value])


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    def config(*argv: str) -> XdsOptions | None:
        args = build_parser().parse_args(["--static-file", str(tmp_path / "f.yaml"), *argv])
        return server_config(args).xds.options

    assert config() is None  # nothing asked for: the default resources
    opts = config("--xds-hash-header", HEADER, "--xds-hash-header", "team/cart=x-cart")
    assert opts is not None and dict(opts.hash_headers) == {"*": HEADER, "team/cart": "x-cart"}
    monkeypatch.setenv("LB_XDS_HASH_HEADERS", "team/cart=x-env")
    opts = config()
    assert opts is not None and dict(opts.hash_headers) == {"team/cart": "x-env"}
    opts = config("--xds-hash-header", HEADER)  # the flag wins over the variable
    assert opts is not None and dict(opts.hash_headers) == {"*": HEADER}
    monkeypatch.setenv("LB_XDS_HASH_HEADERS", "Bad Header")
    with pytest.raises(ValueError, match="hash header"):
        config()
    # --xds-max-names (another flag group) is kept alongside
    monkeypatch.delenv("LB_XDS_HASH_HEADERS")
    opts = config("--xds-max-names", "10", "--xds-hash-header", HEADER)
    assert opts is not None and opts.max_names == 10 and opts.hash_headers == {"*": HEADER}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--xds-max-zones", "x"])
    assert isinstance(build_parser().parse_args([]), argparse.Namespace)


# --- end to end: a stock xds:/// client -------------------------------------------------------------------


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started = [Backend() for _ in range(4)]
    yield started
    for b in started:
        b.stop()


@pytest.fixture
def lookaside(
    tmp_path: pathlib.Path, backends: list[Backend], xds_lookaside: Callable[..., RunningServer]
) -> Callable[..., RunningServer]:
    path = tmp_path / "endpoints.json"
    write_addresses(path, {"default/greet": [b.address for b in backends]})
    return lambda options=None: xds_lookaside(path, options)


@pytest.fixture
def driver(xds_driver: Callable[..., Driver]) -> Callable[[str], Driver]:
    return lambda lookaside: xds_driver(f"xds:///{NAME}", lookaside)


KEYS = [f"user-{i}" for i in range(40)]


def by_key(d: Driver, channel: int, per_key: int = 5) -> dict[str, dict[str, int]]:
    out = d.command(keys=KEYS, header=HEADER, per_key=per_key, channel=channel)
    assert out["failures"] == 0, out["errors"]
    result: dict[str, dict[str, int]] = out["by_key"]
    return result


def test_same_header_value_same_backend(
    lookaside: Callable[..., RunningServer], driver: Callable[[str], Driver]
) -> None:
    srv = lookaside(XdsOptions(hash_headers={"default/greet": HEADER}))
    d = driver(srv.address)
    first = by_key(d, channel=0)
    second = by_key(d, channel=1)  # another channel: its own ring, built from the same resources
    again = by_key(d, channel=0)
    owner = {}
    for key in KEYS:
        assert len(first[key]) == 1, (key, first[key])  # every call with this value on one backend
        owner[key] = next(iter(first[key]))
        assert second[key] == first[key] == again[key]
    spread = {b: sum(1 for k in KEYS if owner[k] == b) for b in set(owner.values())}
    print(f"\n{len(KEYS)} keys over backends: {sorted(spread.values())}")
    assert len(spread) >= 3  # 40 values over 4 backends: they spread (all on <= 2 has p < 1e-10)


def test_control_without_hash_header_rotates(
    lookaside: Callable[..., RunningServer], driver: Callable[[str], Driver]
) -> None:
    srv = lookaside()
    d = driver(srv.address)
    result = by_key(d, channel=0, per_key=8)
    # round robin ignores the header: a value's 8 calls go to several backends
    assert sum(len(v) > 1 for v in result.values()) > len(KEYS) // 2
