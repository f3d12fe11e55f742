"""xDS attacks on one lookaside server process (``python -m lookaside_server --xds``), from raw ADS clients:

* hundreds of spellings of one 1,000-endpoint target on many streams share one canonical Cluster and
  ClusterLoadAssignment: small responses, flat RSS, and an endpoint change does not stall Resolve on another
  target; more names than ``--xds-max-names`` end the stream RESOURCE_EXHAUSTED naming the flag;
* a client that sends without reading the answers is held back (bounded queue, HTTP/2 flow control), and its
  memory is given back; an undecodable request ends the stream INVALID_ARGUMENT; a client cancelling during a
  blocked write leaves no ERROR in the log; NACKs, unknown types and unknown names are logged rate-limited.

Figures are printed (pytest -s) and collected in RESULTS.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from lookaside_dev.attack import ServerProcess, generation_set, wait_for
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"

BIG = 1000  # endpoints of the attacked target
CANONICAL = "big.default:5001"
STREAMS = 10
#: A client that does not read its window: the server's writes block after 64 KiB.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65535)]
UNLIMITED = [("grpc.max_receive_message_length", -1)]
RESULTS: dict[str, object] = {}


def big_set(gen: int) -> list[dict[str, object]]:
    """``BIG`` endpoints on port 5001 ("grpc") whose second octet is ``gen``."""
    return [
        {"ip": f"10.{gen}.{k // 250}.{k % 250 + 1}", "port": 5001, "port_name": "grpc"} for k in range(BIG)
    ]


def write_targets(path: Path, gen: int) -> None:
    write_static(path, {"default/big": big_set(gen), "default/other": generation_set(0xFFFF, 3)})


def spellings(n: int, pad: int = 0) -> list[str]:
    """``n`` distinct spellings of ``big.default:5001`` (the first is the canonical one)."""
    out: list[str] = []
    zeros = 0
    while len(out) < n:
        for suffix in ("", ".svc", ".svc.cluster.local"):
            out.append(f"big.default{suffix}:{'0' * (pad + zeros)}5001")
        zeros += 1
    return out[:n]


def request(
    type_url: str, names: list[str], node: bool = False, **fields: object
) -> discovery_pb2.DiscoveryRequest:
    r = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names, **fields)  # type: ignore[arg-type]
    if node:
        r.node.CopyFrom(base_pb2.Node(id="attacker", cluster="attack"))
    return r


def process_counts(server: ServerProcess) -> dict[str, int]:
    """RSS (kB), open fds and threads of the server process."""
    out = {"rss_kb": server.memory_kb()["VmRSS"], "fds": len(os.listdir(f"/proc/{server.pid}/fd"))}
    with open(f"/proc/{server.pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    return out


async def logged(server: ServerProcess, text: str, timeout: float = 15.0) -> None:
    """Wait (without blocking the event loop) until the server log contains ``text``."""
    await asyncio.to_thread(wait_for, lambda: text in server.log_path.read_text(), timeout, repr(text))


def cpu_seconds(server: ServerProcess) -> float:
    """User + system CPU time of the server process so far."""
    with open(f"/proc/{server.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(tmp_path: Path, *extra: str) -> ServerProcess:
    path = tmp_path / "endpoints.json"
    write_targets(path, 1)
    return ServerProcess(path, tmp_path / "server.log", extra=["--xds", *extra]).start()


def warm(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as ch:
        for service in ("big", "other"):
            pb.LookasideStub(ch).Resolve(pb.Request(service=service, namespace="default"), timeout=10)


class Ads:
    """One raw ADS stream on its own channel; requests go through a queue."""

    def __init__(self, address: str, options: list[tuple[str, int]] | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=options or UNLIMITED)
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.StreamAggregatedResources(self._requests())

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (r := await self.queue.get()) is not None:
            yield r

    async def recv(self, timeout: float = 30.0) -> discovery_pb2.DiscoveryResponse:
        response = await asyncio.wait_for(self.call.read(), timeout)
        assert response is not grpc.aio.EOF, "stream ended"
        return response

    def ack(self, response: discovery_pb2.DiscoveryResponse, names: list[str]) -> None:
        self.queue.put_nowait(
            request(
                response.type_url, names, version_info=response.version_info, response_nonce=response.nonce
            )
        )

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def listeners(response: discovery_pb2.DiscoveryResponse) -> dict[str, str]:
    """Listener name -> the cluster its inline route points to."""
    out = {}
    for any_ in response.resources:
        lis = listener_pb2.Listener()
        assert any_.Unpack(lis)
        hcm = hcm_pb2.HttpConnectionManager()
        assert lis.api_listener.api_listener.Unpack(hcm)
        out[lis.name] = hcm.route_config.virtual_hosts[0].routes[0].route.cluster
    return out


def load_assignments(response: discovery_pb2.DiscoveryResponse) -> dict[str, set[str]]:
    out = {}
    for any_ in response.resources:
        cla = endpoint_pb2.ClusterLoadAssignment()
        assert any_.Unpack(cla)
        out[cla.cluster_name] = {
            lb.endpoint.address.socket_address.address for lle in cla.endpoints for lb in lle.lb_endpoints
        }
    return out


class ResolveProbe:
    """Resolve on another target back to back from a thread (its own channel), latencies recorded."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as ch:
            stub = pb.LookasideStub(ch)
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    stub.Resolve(pb.Request(service="other", namespace="default"), timeout=120)
                except grpc.RpcError as e:
                    self.failures.append(f"{e.code().name}: {e.details()}")
                    continue
                self.latencies.append(time.perf_counter() - started)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(130)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- item 1: names -------------------------------------------------------------------------------------


async def test_spellings_of_one_target_share_one_canonical_resource(tmp_path: Path) -> None:
    """10 streams, each naming 250 spellings of a 1,000-endpoint target for LDS and EDS, then an endpoint
    change while Resolve runs on another target."""
    server = start(tmp_path)
    names = spellings(250)
    streams: list[Ads] = []
    probe: ResolveProbe | None = None
    try:
        warm(server)
        before = process_counts(server)
        sizes = []
        for _ in range(STREAMS):
            ads = Ads(server.address)
            streams.append(ads)
            ads.queue.put_nowait(request(LDS, names, node=True))
            lds = await ads.recv()
            assert lds.type_url == LDS
            got = listeners(lds)
            # every spelling the client dialled gets its Listener, all routing to the one canonical cluster
            assert set(got) == set(names) and set(got.values()) == {CANONICAL}
            ads.ack(lds, names)
            ads.queue.put_nowait(request(CDS, [CANONICAL]))
            cds = await ads.recv()
            assert cds.type_url == CDS and len(cds.resources) == 1
            c = cluster_pb2.Cluster()
            assert cds.resources[0].Unpack(c) and c.eds_cluster_config.service_name == CANONICAL
            ads.ack(cds, [CANONICAL])
            ads.queue.put_nowait(request(EDS, names))  # the server names EDS canonically: one resource
            eds = await ads.recv()
            assert eds.type_url == EDS
            cla = load_assignments(eds)
            assert list(cla) == [CANONICAL] and len(cla[CANONICAL]) == BIG
            ads.ack(eds, names)
            sizes.append(lds.ByteSize() + cds.ByteSize() + eds.ByteSize())
        added = process_counts(server)

        probe = ResolveProbe(server.address)
        started = probe
        await asyncio.to_thread(wait_for, lambda: len(started.latencies) >= 20, 10, "Resolve answering")
        changed_at = time.perf_counter()
        cpu_before = cpu_seconds(server)
        write_targets(server.static_file, 2)

        async def update(ads: Ads) -> float:
            while True:
                response = await ads.recv(60)
                ads.ack(response, names)
                if response.type_url == EDS:
                    (ips,) = load_assignments(response).values()
                    assert len(ips) == BIG and all(ip.startswith("10.2.") for ip in ips)
                    return time.perf_counter() - changed_at

        delays = await asyncio.gather(*(update(ads) for ads in streams))
        cpu = cpu_seconds(server) - cpu_before
        probe.stop()
        assert server.alive(), server.tail()
    finally:
        if probe is not None:
            probe.stop()
        for ads in streams:
            await ads.close()
        code = server.stop()
    figures = {
        "spellings per stream": len(names),
        "request bytes (LDS)": request(LDS, names).ByteSize(),
        "response bytes per stream (LDS+CDS+EDS)": sizes[0],
        "rss added by 10 streams MB": round((added["rss_kb"] - before["rss_kb"]) / 1024, 1),
        "fds/threads before -> with streams": f"{before['fds']}/{before['threads']} -> "
        f"{added['fds']}/{added['threads']}",
        "endpoint change reached all streams s": round(max(delays), 3),
        "server cpu for the change s": round(cpu, 2),
        "resolve during change: calls": len(probe.latencies),
        "resolve p99 ms": round(probe.quantile(0.99) * 1000, 1),
        "resolve max ms": round(max(probe.latencies) * 1000, 1),
    }
    RESULTS["aliases"] = figures
    print("\nxDS spellings:", figures)
    assert not probe.failures, probe.failures[:5]
    assert sizes[0] < 300_000, sizes  # 250 Listeners of ~200 bytes + one 1,000-endpoint assignment
    assert added["rss_kb"] - before["rss_kb"] < 60 * 1024, figures
    # Server CPU is what the change costs (wall-clock figures depend on what else shares the cores): one
    # shared ClusterLoadAssignment build plus ten small responses, not 10 x 250 assignments of 1,000
    # endpoints (before: ~60 s of CPU for 10 streams of 522 spellings, and Resolve waited all along).
    assert cpu < 2.0, figures
    assert max(probe.latencies) < 10.0 and max(delays) < 30.0, figures
    log = server.log_path.read_text()
    assert log.count("not a name this server gives out") <= 5, "unknown EDS names are logged rate-limited"
    assert server.errors_logged() == [], server.errors_logged()[:5]
    assert code == 0, server.tail()


async def test_more_names_than_the_cap_end_the_stream_resource_exhausted(tmp_path: Path) -> None:
    server = start(tmp_path)  # the default cap: 256 names per stream
    try:
        warm(server)
        # one request over the cap
        ads = Ads(server.address)
        ads.queue.put_nowait(request(EDS, spellings(522), node=True))
        try:
            await ads.recv()
            raise AssertionError("the stream was answered")
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--xds-max-names" in (e.details() or "") and "256" in (e.details() or "")
        await ads.close()
        # under the cap per request, over it for the stream (all types together)
        ads = Ads(server.address)
        ads.queue.put_nowait(request(LDS, spellings(150), node=True))
        ads.ack(await ads.recv(), spellings(150))
        ads.queue.put_nowait(request(CDS, spellings(150, pad=100)))
        try:
            await ads.recv()
            raise AssertionError("the stream was answered")
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--xds-max-names" in (e.details() or "")
        await ads.close()
        assert server.alive()
    finally:
        code = server.stop()
    assert server.errors_logged() == [], server.errors_logged()[:5]
    assert code == 0


# --- item 2: stream hygiene ----------------------------------------------------------------------------


async def test_a_client_that_does_not_read_is_held_back(tmp_path: Path) -> None:
    """Its first answer fills its window; then it sends 1,500 requests of 60 kB without reading."""
    server = start(tmp_path)
    names = spellings(249, pad=175)  # ~60 kB per request, under the name cap
    try:
        warm(server)
        before = process_counts(server)
        channel = grpc.aio.insecure_channel(server.address, options=SMALL_WINDOW)
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await call.write(request(EDS, [CANONICAL], node=True))
        flood = request(LDS, names)
        accepted = 0
        stalled = False
        for _ in range(1500):
            try:
                await asyncio.wait_for(call.write(flood), 3.0)
            except TimeoutError:
                stalled = True
                break
            accepted += 1
        during = process_counts(server)
        call.cancel()
        await channel.close()
        await logged(server, "ADS stream 1 (node 'attacker') ended")
        after = process_counts(server)
        assert server.alive(), server.tail()
    finally:
        code = server.stop()
    figures = {
        "request bytes": flood.ByteSize(),
        "requests accepted": accepted,
        "rss added while flooding MB": round((during["rss_kb"] - before["rss_kb"]) / 1024, 1),
        "rss added after the client left MB": round((after["rss_kb"] - before["rss_kb"]) / 1024, 1),
        "fds/threads before -> after": (
            f"{before['fds']}/{before['threads']} -> {after['fds']}/{after['threads']}"
        ),
    }
    RESULTS["flood"] = figures
    print("\nxDS flood without reading:", figures)
    assert stalled and accepted < 500, figures  # held back: a bounded queue plus HTTP/2 windows
    assert during["rss_kb"] - before["rss_kb"] < 30 * 1024, figures
    assert after["fds"] <= before["fds"] + 2 and after["threads"] <= before["threads"] + 2, figures
    assert server.errors_logged() == [], server.errors_logged()[:5]  # the cancel in a blocked write is quiet
    assert code == 0


async def test_undecodable_request_ends_the_stream_invalid_argument(tmp_path: Path) -> None:
    server = start(tmp_path)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            method = channel.stream_stream(ADS_METHOD)  # bytes in, bytes out
            release = asyncio.Event()

            async def garbage() -> AsyncIterator[bytes]:
                yield b"\xff\xff\xff\xff"
                await release.wait()

            call = method(garbage(), timeout=20)
            try:
                async for _ in call:
                    pass
                code = await call.code()
            except grpc.aio.AioRpcError as e:
                code = e.code()
                assert "DiscoveryRequest" in (e.details() or "")
            finally:
                release.set()
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        exit_code = server.stop()
    assert "request is not a DiscoveryRequest" in server.log_path.read_text()
    assert exit_code == 0


async def test_cancel_during_a_blocked_write_logs_no_error(tmp_path: Path) -> None:
    server = start(tmp_path)
    try:
        warm(server)
        version = 1
        for round_ in range(3):
            ads = Ads(server.address, SMALL_WINDOW)
            ads.queue.put_nowait(request(EDS, [CANONICAL], node=True))
            await logged(server, f"ADS stream {round_ + 1} from node 'attacker'")
            # 1,000-endpoint updates the client never reads: the first answer fills most of its 64 KiB window,
            # the next one blocks in the write
            for gen in range(2, 5):
                write_targets(server.static_file, 10 * round_ + gen)
                version += 1
                await logged(server, f"big.default changed: {BIG} endpoint(s), version {version}\n")
            await ads.close()
            await logged(server, f"ADS stream {round_ + 1} (node 'attacker') ended")
        assert server.alive()
    finally:
        code = server.stop()
    assert server.errors_logged() == [], server.errors_logged()[:5]
    assert code == 0


async def test_rejects_are_logged_rate_limited(tmp_path: Path) -> None:
    """3,000 requests (NACKs with long details, unknown type URLs, unknown and invalid names)."""
    server = start(tmp_path)
    total = 0
    try:
        warm(server)
        before = len(server.log_path.read_text().splitlines())
        ads = Ads(server.address)
        for i in range(3000):
            kind = i % 3
            if kind == 0:
                r = request(
                    EDS,
                    [CANONICAL],
                    node=i == 0,
                    response_nonce="x",
                    error_detail=status_pb2.Status(code=3, message="no" * 200),
                )
            elif kind == 1:
                r = request(f"type.googleapis.com/bogus.T{i}", ["x"] * 20)
            else:
                r = request(
                    LDS, [f"nope{i}-{j}.default" for j in range(30)] + [f"Bad_{i}_{j}" for j in range(30)]
                )
            total += r.ByteSize()
            ads.queue.put_nowait(r)
        ads.queue.put_nowait(None)  # half-close: the server ends the stream after the last request
        async for _ in ads.call:
            pass
        assert await ads.call.code() == grpc.StatusCode.OK
        await ads.channel.close()
        lines = len(server.log_path.read_text().splitlines()) - before
    finally:
        code = server.stop()
    figures = {"request MB": round(total / 1e6, 2), "log lines": lines}
    RESULTS["log"] = figures
    print("\nxDS rejects:", figures)
    assert lines < 60, figures  # 5 per (client, reason) per 30 s, plus the stream's own lines
    assert server.errors_logged() == []
    assert code == 0
