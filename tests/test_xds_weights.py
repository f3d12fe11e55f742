"""Least-loaded weights over xDS: the load clients report with ReportLoad becomes the locality
``load_balancing_weight`` of each endpoint in the ClusterLoadAssignment, and a meaningful change pushes a new
one (rate-limited like the Watch weight pushes). Driven by a raw ADS client against the real server."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from test_xds import RawAds, names_of

from lookaside_dev.static_files import write_addresses
from lookaside_grpc import protocol as pb
from lookaside_server import (
    BackendEndpoint,
    ListenConfig,
    RunningServer,
    ServerConfig,
    StaticFileConfig,
    Target,
    XdsConfig,
    run_in_thread,
)
from lookaside_server._api import load as _load
from lookaside_server._xds.resources import ENDPOINTS, XdsOptions, endpoint_weights, load_assignment

NAME = "greet.default"
A, B, C = "10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"
EPS = tuple(BackendEndpoint(a.split(":")[0], int(a.split(":")[1])) for a in (A, B, C))


# --- resources --------------------------------------------------------------------------------------------


def test_endpoint_weights_follow_the_load_board() -> None:
    opts = XdsOptions()
    assert endpoint_weights(EPS, opts) == [1, 1, 1]  # no load reported: equal
    assert endpoint_weights(EPS, opts, {}) == [1, 1, 1]
    load = {("10.0.0.1", 8080): 3, ("10.0.0.2", 8080): 100, ("10.0.0.3", 8080): 100}
    assert endpoint_weights(EPS, opts, load) == [3, 100, 100]
    # an endpoint nobody reported on yet (a new pod) gets the mean of the known weights: neither starved
    # nor flooded
    assert endpoint_weights(EPS, opts, {("10.0.0.1", 8080): 20, ("10.0.0.2", 8080): 100}) == [20, 100, 60]
    # weights of endpoints that are not in the set are ignored; none falls below 1
    assert endpoint_weights(EPS, opts, {("10.9.9.9", 1): 50}) == [1, 1, 1]
    assert endpoint_weights(EPS[:1], opts, {("10.0.0.1", 8080): 0}) == [1]
    # load weights can be turned off: the weight hook decides
    hook = XdsOptions(load_weights=False, weight=lambda e: 7)
    assert endpoint_weights(EPS, hook, load) == [7, 7, 7]
    assert endpoint_weights(EPS, XdsOptions(weight=lambda e: 7)) == [7, 7, 7]


def test_load_assignment_carries_the_load_weights() -> None:
    load = {("10.0.0.1", 8080): 2, ("10.0.0.2", 8080): 100}
    cla = load_assignment(NAME, EPS, XdsOptions(), load)
    assert [lle.load_balancing_weight.value for lle in cla.endpoints] == [2, 100, 51]
    assert [lle.lb_endpoints[0].endpoint.address.socket_address.address for lle in cla.endpoints] == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
    ]


# --- against the real server ------------------------------------------------------------------------------


def locality_weights(response: discovery_pb2.DiscoveryResponse, name: str = NAME) -> dict[str, int]:
    cla = names_of(response, endpoint_pb2.ClusterLoadAssignment)[name]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    out = {}
    for lle in cla.endpoints:
        (lb,) = lle.lb_endpoints
        sa = lb.endpoint.address.socket_address
        out[f"{sa.address}:{sa.port_value}"] = lle.load_balancing_weight.value
    return out


def report(loaded: str, *, client: str = "c1", outstanding: int = 40) -> pb.LoadReport:
    """One client's load report: ``loaded`` is slow with many calls in flight, the others idle and fast."""
    return pb.LoadReport(
        service="greet",
        namespace="default",
        client_id=client,
        interval_ms=1000,
        endpoints=[
            pb.EndpointLoad(
                ip=a.split(":")[0],
                port=int(a.split(":")[1]),
                outstanding=outstanding if a == loaded else 0,
                latency_ms=50.0 if a == loaded else 1.0,
                calls=100,
            )
            for a in (A, B, C)
        ],
    )


@pytest.fixture
def running(tmp_path: pathlib.Path) -> Iterator[Callable[..., RunningServer]]:
    path = tmp_path / "endpoints.json"
    write_addresses(path, {"default/greet": [A, B, C]})
    servers: list[RunningServer] = []

    def start(**config: object) -> RunningServer:
        srv = run_in_thread(
            ServerConfig(
                listen=ListenConfig(host="127.0.0.1", port=0, grace=0.1),
                source=StaticFileConfig(path, poll_interval=0.02),
                **config,
            )
        )  # type: ignore[arg-type]
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[str], tuple[RawAds, pb.LookasideStub]]]:
    opened: list[RawAds] = []
    channels: list[grpc.aio.Channel] = []

    def open_(address: str) -> tuple[RawAds, pb.LookasideStub]:
        ads = RawAds(address, node="weights")
        opened.append(ads)
        channel = grpc.aio.insecure_channel(address)
        channels.append(channel)
        return ads, pb.LookasideStub(channel)

    yield open_
    for ads in opened:
        await ads.close()
    for channel in channels:
        await channel.close()


class Responses:
    """Reads an ADS stream in the background (a timed-out ``read()`` would cancel the whole call)."""

    def __init__(self, ads: RawAds) -> None:
        self.ads = ads
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryResponse | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while (response := await self.ads.call.read()) is not grpc.aio.EOF:
                self.queue.put_nowait(response)
        finally:
            self.queue.put_nowait(None)

    async def next(self, timeout: float) -> discovery_pb2.DiscoveryResponse:
        """The next EDS response, ACKed."""
        response = await asyncio.wait_for(self.queue.get(), timeout)
        assert response is not None, "stream ended"
        assert response.type_url == ENDPOINTS
        self.ads.send(ENDPOINTS, [NAME], ack=response)
        return response

    async def until(
        self, ok: Callable[[dict[str, int]], bool], seconds: float = 5.0
    ) -> discovery_pb2.DiscoveryResponse:
        """EDS responses until one's locality weights satisfy ``ok``; fail after ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "no ClusterLoadAssignment with the expected weights before the deadline"
            try:
                response = await self.next(left)
            except TimeoutError:
                pytest.fail("no ClusterLoadAssignment with the expected weights before the deadline")
            if ok(locality_weights(response)):
                return response

    async def none_for(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            response = await self.next(seconds)
            pytest.fail(f"unexpected push: {locality_weights(response)}")

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def subscribe(ads: RawAds) -> tuple[Responses, discovery_pb2.DiscoveryResponse]:
    ads.send(ENDPOINTS, [NAME])
    responses = Responses(ads)
    return responses, await responses.next(10)


async def test_reported_load_reaches_the_locality_weights(
    running: Callable[..., RunningServer],
    clients: Callable[[str], tuple[RawAds, pb.LookasideStub]],
) -> None:
    srv = running()
    ads, stub = clients(srv.address)
    eds_stream, eds = await subscribe(ads)
    assert locality_weights(eds) == {A: 1, B: 1, C: 1}  # nobody reported load yet

    await stub.ReportLoad(report(A))
    update = await eds_stream.until(lambda w: w[A] < w[B])
    w = locality_weights(update)
    assert w[B] == w[C] == _load.WEIGHT_SCALE and 1 <= w[A] <= w[B] // 10, w
    assert int(update.version_info) > int(eds.version_info)

    # the same load again is no meaningful change: nothing is pushed
    await stub.ReportLoad(report(A))
    await eds_stream.none_for(2 * _load.MIN_PUSH_INTERVAL + 0.3)

    # the load moves to C: a new assignment with C the lightest-weighted endpoint
    await stub.ReportLoad(report(C))
    update = await eds_stream.until(lambda w: w[C] < w[A] and w[C] < w[B])
    assert locality_weights(update)[A] == _load.WEIGHT_SCALE

    # an endpoint change keeps the weights of the endpoints that stay (and the newcomer gets their mean)
    path = srv.server.config.source.path  # type: ignore[union-attr]
    write_addresses(pathlib.Path(path), {"default/greet": [A, C, "10.0.0.4:8080"]})  # type: ignore[arg-type]
    update = await eds_stream.until(lambda w: B not in w)
    w = locality_weights(update)
    assert w[A] == _load.WEIGHT_SCALE and w[C] < w[A] and w["10.0.0.4:8080"] == round((w[A] + w[C]) / 2), w
    await eds_stream.close()


async def test_weight_pushes_are_rate_limited(
    running: Callable[..., RunningServer],
    clients: Callable[[str], tuple[RawAds, pb.LookasideStub]],
) -> None:
    srv = running()
    ads, stub = clients(srv.address)
    eds_stream, _ = await subscribe(ads)
    started = time.monotonic()
    # the load flips between A and B every 20 ms: every report is a meaningful change
    for i in range(76):
        await stub.ReportLoad(report(A if i % 2 == 0 else B))  # ends with B
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - started
    await asyncio.sleep(2 * _load.MIN_PUSH_INTERVAL)  # the last pending push goes out
    pushes: list[dict[str, int]] = []
    while not eds_stream.queue.empty():
        pushes.append(locality_weights(await eds_stream.next(1)))
    await eds_stream.close()
    assert len(pushes) >= 2, pushes
    # at most one push per MIN_PUSH_INTERVAL per target (plus the immediate first and the trailing one)
    assert len(pushes) <= elapsed / _load.MIN_PUSH_INTERVAL + 2, (len(pushes), elapsed)
    # the last push is the last report's load: B is the loaded one
    assert pushes[-1][B] < pushes[-1][A], pushes[-1]


async def test_load_weights_can_be_turned_off_and_streams_stop_listening(
    running: Callable[..., RunningServer],
    clients: Callable[[str], tuple[RawAds, pb.LookasideStub]],
) -> None:
    srv = running(xds=XdsConfig(options=XdsOptions(load_weights=False)))
    ads, stub = clients(srv.address)
    eds_stream, eds = await subscribe(ads)
    assert locality_weights(eds) == {A: 1, B: 1, C: 1}
    await stub.ReportLoad(report(A))
    await eds_stream.none_for(2 * _load.MIN_PUSH_INTERVAL + 0.3)
    await eds_stream.close()

    srv2 = running()
    ads2, stub2 = clients(srv2.address)
    await ads2.subscribe(ENDPOINTS, [NAME])
    board = srv2.server.xds.load  # type: ignore[attr-defined]
    target = Target("greet", "default")

    def listeners() -> int:
        async def get() -> int:
            tl = board._targets.get(target)
            return len(tl.listeners) if tl is not None else 0

        return asyncio.run_coroutine_threadsafe(get(), srv2._loop).result(5)

    assert listeners() == 1
    ads2.send(ENDPOINTS, [])  # unsubscribing releases the target and its weight listener
    deadline = time.monotonic() + 5
    while listeners() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert listeners() == 0
