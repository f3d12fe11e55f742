"""Client-side weighted round robin for stock ``xds:///`` clients: ``--xds-lb-policy wrr`` gives every
Cluster gRPC's ``client_side_weighted_round_robin`` (under ``wrr_locality``, round robin as the fallback),
whose weights come from the backends' per-call ORCA reports (``endpoint-load-metrics-bin`` trailers), and
groups the endpoints into one locality (per zone): WRR picks within a locality, so with one locality per
endpoint (the round-robin layout) the reports would change nothing, as the control below shows."""

from __future__ import annotations

import pathlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
    client_side_weighted_round_robin_pb2 as cswrr_pb2,
)
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from xds.data.orca.v3 import orca_load_report_pb2

from examples.greet import greet_pb2, greet_pb2_grpc
from examples.greet.server import GreetServicer
from lookaside_dev.static_files import write_addresses
from lookaside_dev.xds_client import Driver
from lookaside_server import (
    RunningServer,
)
from lookaside_server._cli.flags import build_parser, server_config
from lookaside_server._xds.resources import XdsOptions, cluster

NAME = "greet.default"
ORCA_TRAILER = "endpoint-load-metrics-bin"


# --- resources and flags ----------------------------------------------------------------------------------


def test_cluster_asks_for_client_side_wrr() -> None:
    c = cluster(NAME, XdsOptions(lb_policy="wrr", wrr_blackout_period=0.5))
    (top,) = c.load_balancing_policy.policies
    locality = wrr_locality_pb2.WrrLocality()
    assert top.typed_extension_config.typed_config.Unpack(locality)
    wrr, fallback = locality.endpoint_picking_policy.policies
    config = cswrr_pb2.ClientSideWeightedRoundRobin()
    assert wrr.typed_extension_config.typed_config.Unpack(config)
    assert config.blackout_period.ToMilliseconds() == 500
    assert fallback.typed_extension_config.name.endswith("round_robin")
    # the default stays plain round robin
    assert not cluster(NAME, XdsOptions()).HasField("load_balancing_policy")
    assert cluster(NAME, XdsOptions()).lb_policy == cluster_pb2.Cluster.ROUND_ROBIN


def test_flag_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    def config(*argv: str) -> XdsOptions | None:
        args = build_parser().parse_args(["--static-file", str(tmp_path / "f.yaml"), *argv])
        return server_config(args).xds.options

    opts = config("--xds-lb-policy", "wrr")
    assert opts is not None and opts.lb_policy == "wrr"
    monkeypatch.setenv("LB_XDS_LB_POLICY", "wrr")
    opts = config()
    assert opts is not None and opts.lb_policy == "wrr"
    monkeypatch.setenv("LB_XDS_LB_POLICY", "least_request")
    with pytest.raises(SystemExit):
        config()
    with pytest.raises(ValueError, match="lb_policy"):
        XdsOptions(lb_policy="least_request")


# --- end to end: ORCA-reporting backends, a stock xds:/// client ------------------------------------------


class OrcaGreeter(GreetServicer):
    """Greets and attaches a per-call ORCA load report: ``utilization`` at 100 queries a second, so gRPC's
    weight (qps / utilization) is 100 / utilization."""

    def __init__(self, name: str, utilization: float) -> None:
        super().__init__(name)
        self.report = orca_load_report_pb2.OrcaLoadReport(
            cpu_utilization=utilization, rps_fractional=100.0
        ).SerializeToString()

    def Greet(  # noqa: N802 - gRPC method name
        self, request: greet_pb2.GreetingRequest, context: grpc.ServicerContext
    ) -> greet_pb2.GreetingResponse:
        context.set_trailing_metadata(((ORCA_TRAILER, self.report),))
        return super().Greet(request, context)


@pytest.fixture
def backends() -> Iterator[list[str]]:
    """Three Greet backends: the first reports 90 % utilization, the others 10 % (weights 1 : 9 : 9)."""
    servers, addresses = [], []
    for utilization in (0.9, 0.1, 0.1):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        port = server.add_insecure_port("127.0.0.1:0")
        greet_pb2_grpc.add_GreetServiceServicer_to_server(
            OrcaGreeter(f"127.0.0.1:{port}", utilization), server
        )
        server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    yield addresses
    for server in servers:
        server.stop(None).wait(5)


@pytest.fixture
def lookaside(
    tmp_path: pathlib.Path, backends: list[str], xds_lookaside: Callable[..., RunningServer]
) -> Callable[..., RunningServer]:
    path = tmp_path / "endpoints.json"
    write_addresses(path, {"default/greet": backends})
    return lambda options=None: xds_lookaside(path, options)


@pytest.fixture
def driver(xds_driver: Callable[..., Driver]) -> Callable[[str], Driver]:
    return lambda lookaside: xds_driver(f"xds:///{NAME}", lookaside)


#: Fast weights for the test: no blackout, new weights every 100 ms (gRPC's floor).
FAST = {"wrr_blackout_period": 0.0, "wrr_weight_update_period": 0.1}


def share_of_loaded(
    d: Driver, loaded: str, *, settle: Callable[[float], bool], deadline: float = 20.0
) -> float:
    """Batches of 300 calls until ``settle(share of the loaded backend)`` (weights need a few reports and an
    update period) or the deadline; the last batch's share."""
    end = time.monotonic() + deadline
    while True:
        counts, failures, errors = d.call(300)
        assert failures == 0, errors
        share = counts[loaded] / 300
        if settle(share) or time.monotonic() > end:
            print(f"\nshare of the loaded backend: {share:.1%} ({dict(counts)})")
            return share


def test_orca_weights_steer_calls(
    lookaside: Callable[..., RunningServer], driver: Callable[[str], Driver], backends: list[str]
) -> None:
    srv = lookaside(XdsOptions(lb_policy="wrr", **FAST))
    share = share_of_loaded(driver(srv.address), backends[0], settle=lambda s: s < 0.12)
    assert share < 0.12  # weight 1 of 19: about 5 %, against 33 % for round robin


def test_control_round_robin_ignores_the_reports(
    lookaside: Callable[..., RunningServer], driver: Callable[[str], Driver], backends: list[str]
) -> None:
    srv = lookaside(XdsOptions(**FAST))
    d = driver(srv.address)
    d.call(300)  # connect and report for a while: nothing changes
    counts: Counter[str] = Counter()
    for _ in range(3):
        batch, failures, _ = d.call(300)
        assert failures == 0
        counts += batch
    share = counts[backends[0]] / 900
    print(f"\nround robin: loaded backend {share:.1%} ({dict(counts)})")
    assert share > 0.25


def test_control_wrr_with_one_locality_per_endpoint_does_nothing(
    lookaside: Callable[..., RunningServer],
    driver: Callable[[str], Driver],
    backends: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # why WRR groups the endpoints: with the round-robin layout (a locality each) WRR has one endpoint per
    # locality and the locality weights (equal) decide: the reports change nothing
    monkeypatch.setattr(XdsOptions, "grouped", lambda self, target: False)
    srv = lookaside(XdsOptions(lb_policy="wrr", **FAST))
    d = driver(srv.address)
    d.call(300)
    counts: Counter[str] = Counter()
    for _ in range(3):
        batch, failures, _ = d.call(300)
        assert failures == 0
        counts += batch
    share = counts[backends[0]] / 900
    print(f"\nwrr, a locality per endpoint: loaded backend {share:.1%} ({dict(counts)})")
    assert share > 0.25
