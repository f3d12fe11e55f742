"""Fuzzing the lookaside gRPC API (hypothesis): typed requests with hostile strings, out-of-range enums and
counts; raw undecodable message bytes; and garbage or truncated HTTP/2 on a raw socket.

Every request must get a well-formed status from an expected set within its deadline (never UNKNOWN or
INTERNAL from a server exception), the server must log no error, and afterwards it must keep serving with its
cached state intact: the known target resolves to the same endpoints at the same version, and no junk target
was left tracked. Bounded: derandomized hypothesis runs of a few hundred examples; the file runs in < 60 s.
"""

from __future__ import annotations

import logging
import random
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookaside_dev.attack import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    TYPED_OK,
    WINDOW_UPDATE,
    frame,
    frames_of,
    grpc_message,
    grpc_request_headers,
    hpack_literal,
    send_raw,
)
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb
from lookaside_grpc._generated import lookaside_pb2 as pb2
from lookaside_server import ListenConfig, ServerConfig, StaticFileConfig, run_in_thread

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
CALL_TIMEOUT = 5.0
#: The server's receive limit (ServerConfig.limits.max_message_bytes if it has one, else grpc's 4 MiB); set by
#: the fixture. A larger request is refused by grpc with RESOURCE_EXHAUSTED before any handler runs.
LIMIT = {"bytes": 4 * 1024 * 1024}

GRPC_EPS = [{"ip": f"10.0.0.{i}", "port": 50051, "port_name": "grpc", "zone": "z1"} for i in (1, 2, 3)]
HTTP_EPS = [{"ip": f"10.0.0.{i}", "port": 8080, "port_name": "http"} for i in (1, 2, 3)]
FILE = {
    "default/greet": GRPC_EPS + HTTP_EPS,
    "default/drained": [{"ip": "10.0.1.1", "port": 50051, "port_name": "grpc", "ready": False}],
}
TRACKED = {("default", "greet"), ("default", "drained")}
GRPC_SET = {(e["ip"], 50051) for e in GRPC_EPS}
HTTP_SET = {(e["ip"], 8080) for e in HTTP_EPS}

_RFC1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_RFC1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def service_ok(name: str) -> bool:
    return len(name) <= 63 and _RFC1035.fullmatch(name) is not None


def namespace_ok(name: str) -> bool:
    return len(name) <= 63 and _RFC1123.fullmatch(name) is not None


def port_set(port: str) -> set[tuple[str, int]] | None:
    """The endpoints of default/greet a port string selects (None: not a port of it)."""
    if port in ("", "grpc"):
        return GRPC_SET
    if port == "http":
        return HTTP_SET
    if port.isascii() and port.isdigit() and len(port.lstrip("0")) <= 5:
        return {50051: GRPC_SET, 8080: HTTP_SET}.get(int(port))
    return None


# --- the server under attack ----------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Collects ERROR records (a servicer exception is logged by grpc at ERROR)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")

    def server_errors(self) -> list[str]:
        # grpc.aio logs an undecodable request body too (the framework, not the servicer): accepted, raw bytes
        return [r for r in self.records if "DecodeError" not in r]


@dataclass
class Target:
    address: str
    channel: grpc.Channel
    stub: pb.LookasideStub
    server: object
    errors: ErrorLog
    baseline: pb2.TargetStatus

    def assert_intact(self) -> None:
        """Still serving, same endpoints and version for the known target, no junk target, no error."""
        assert self.server._thread.is_alive()  # type: ignore[attr-defined]
        with grpc.insecure_channel(self.address) as fresh:
            stub = pb.LookasideStub(fresh)
            resp = stub.Resolve(
                pb.Request(service="greet", namespace="default", router=pb.ROUNDROBIN, count=6),
                timeout=CALL_TIMEOUT,
            )
            assert resp.version == 1
            assert {(e.ip, e.port) for e in resp.endpoints} == GRPC_SET
            watch = stub.Watch(pb.WatchRequest(service="greet", namespace="default"), timeout=CALL_TIMEOUT)
            first = next(iter(watch))
            watch.cancel()
            assert first.version == 1 and {(e.ip, e.port) for e in first.endpoints} == GRPC_SET
            status = stub.Status(pb2.StatusRequest(), timeout=CALL_TIMEOUT)
        assert {(t.namespace, t.service) for t in status.targets} == TRACKED
        now = next(t for t in status.targets if t.service == "greet")
        assert now.version == self.baseline.version and list(now.endpoints) == list(self.baseline.endpoints)
        assert self.errors.server_errors() == []


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    path = tmp_path_factory.mktemp("fuzz") / "endpoints.json"
    write_static(path, FILE)
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    server = run_in_thread(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5),
            source=StaticFileConfig(path, poll_interval=0.05),
        )
    )
    limits = getattr(server.server.config, "limits", None)
    LIMIT["bytes"] = getattr(limits, "max_message_bytes", LIMIT["bytes"])
    channel = grpc.insecure_channel(server.address)
    stub = pb.LookasideStub(channel)
    try:
        for service in ("greet", "drained"):  # subscribe the known targets
            try:
                stub.Resolve(pb.Request(service=service, namespace="default"), timeout=CALL_TIMEOUT)
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.UNAVAILABLE
        base = stub.Status(pb2.StatusRequest(service="greet", namespace="default"), timeout=CALL_TIMEOUT)
        yield Target(server.address, channel, stub, server, errors, base.targets[0])
    finally:
        channel.close()
        server.stop()
        logging.getLogger().removeHandler(errors)


def call(fn: object, request: object, timeout: float = CALL_TIMEOUT) -> tuple[grpc.StatusCode, str, object]:
    """Make a unary call; return (code, details, response or None); fail if it overran its deadline."""
    start = time.monotonic()
    try:
        resp = fn(request, timeout=timeout)  # type: ignore[operator]
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        resp, code, details = None, e.code(), e.details() or ""
    assert time.monotonic() - start < timeout + 1.0
    assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, "no answer within the deadline"
    return code, details, resp


# --- strategies -----------------------------------------------------------------------------------------

CONTROL = st.characters(max_codepoint=0x1F) | st.sampled_from("\x00\x7f\u0085\u2028\u202e\ufeff\U0001f600")
names = st.one_of(
    st.sampled_from(
        [
            "greet",
            "default",
            "drained",
            "",
            "Greet",
            "greet\n",
            "-greet",
            "greet-",
            "a" * 63,
            "a" * 64,
            "kube-system",
            "1abc",
            "gr\x00eet",
            "défault",
            "greet.default",
        ]
    ),
    st.from_regex(r"[a-z0-9][-a-z0-9]{0,12}", fullmatch=True),
    st.text(max_size=80),
    st.text(alphabet=CONTROL, max_size=20),
    st.integers(64, 100_000).map(lambda n: "a" * n),
)
services = st.one_of(st.just("greet"), st.just("drained"), names)
namespaces = st.one_of(st.just("default"), names)
ports = st.one_of(
    st.sampled_from(
        [
            "",
            "grpc",
            "http",
            "50051",
            "8080",
            "050051",
            "0",
            "65536",
            "-1",
            "4294967296",
            "\u00b2",
            "\u0661",
            "\uff15\uff10\uff10\uff15\uff11",
            "9" * 5000,
            "grpc\x00",
            " 50051",
        ]
    ),
    st.integers(0, 2**70).map(str),
    st.text(max_size=30),
    st.from_regex(r"[a-z][-a-z0-9]{0,10}", fullmatch=True),
)
routers = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, -1]), st.integers(-(2**31), 2**31 - 1))
counts = st.one_of(st.sampled_from([0, 1, 2, 999, 1000, 1001, 2**32 - 1]), st.integers(0, 2**32 - 1))


def too_big(message: object) -> bool:
    return message.ByteSize() > LIMIT["bytes"]  # type: ignore[attr-defined]


def expected_resolve(r: pb.Request) -> set[grpc.StatusCode]:
    """The statuses Resolve may answer ``r`` with (an oracle independent of the server's code)."""
    INVALID, NOT_FOUND, UNAVAILABLE, OK = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.OK,
    )
    if too_big(r):
        return {grpc.StatusCode.RESOURCE_EXHAUSTED}
    if not service_ok(r.service) or not namespace_ok(r.namespace):
        return {INVALID}
    load_router = r.router in (pb.LEAST_REQUEST, pb.PEAK_EWMA, pb.WEIGHTED)  # may or may not be served yet
    if r.router not in (pb.RANDOM, pb.ROUNDROBIN) and not load_router:
        return {INVALID}
    if (r.count or 1) > 1000:
        return {INVALID}
    extra = {INVALID} if load_router else set()
    if (r.namespace, r.service) == ("default", "greet"):
        return ({OK} if port_set(r.port) is not None else {INVALID}) | extra
    if (r.namespace, r.service) == ("default", "drained"):
        return (
            {UNAVAILABLE}
            if r.port in ("", "grpc", "50051") or r.port.lstrip("0") == "50051"
            else {INVALID, UNAVAILABLE}
        ) | extra
    return {NOT_FOUND} | extra


# --- typed fuzzing --------------------------------------------------------------------------------------


@FUZZ
@given(service=services, namespace=namespaces, port=ports, router=routers, count=counts)
def test_fuzz_resolve(
    target: Target, service: str, namespace: str, port: str, router: int, count: int
) -> None:
    request = pb.Request(service=service, namespace=namespace, port=port, router=router, count=count)
    code, details, resp = call(target.stub.Resolve, request)
    assert code in expected_resolve(request), (code, details, request)
    assert len(details.encode()) <= 1100, "status messages are clipped"
    if code is grpc.StatusCode.OK:
        assert isinstance(resp, pb.Response)
        picks = [(e.ip, e.port) for e in resp.endpoints]
        assert len(picks) == (count or 1) and set(picks) <= (port_set(port) or set())
        assert (resp.address, resp.port) == picks[0] and resp.version == 1


@FUZZ
@given(service=services, namespace=namespaces, port=ports)
def test_fuzz_watch(target: Target, service: str, namespace: str, port: str) -> None:
    request = pb.WatchRequest(service=service, namespace=namespace, port=port)
    start = time.monotonic()
    stream = target.stub.Watch(request, timeout=CALL_TIMEOUT)
    try:
        first = next(iter(stream))
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        first, code = None, e.code()
    finally:
        stream.cancel()
    assert time.monotonic() - start < CALL_TIMEOUT + 1.0
    resolve_like = expected_resolve(pb.Request(service=service, namespace=namespace, port=port))
    if grpc.StatusCode.UNAVAILABLE in resolve_like:  # drained: Watch streams the (empty) eligible set
        resolve_like = (resolve_like - {grpc.StatusCode.UNAVAILABLE}) | {grpc.StatusCode.OK}
    assert code in resolve_like, (code, request)
    if first is not None:
        want = port_set(port) if service == "greet" else set()
        assert {(e.ip, e.port) for e in first.endpoints} == want and first.version == 1


@settings(FUZZ, max_examples=150)
@given(service=names, namespace=names)
def test_fuzz_status(target: Target, service: str, namespace: str) -> None:
    request = pb2.StatusRequest(service=service, namespace=namespace)
    code, details, resp = call(target.stub.Status, request)
    if too_big(request):
        want = {grpc.StatusCode.RESOURCE_EXHAUSTED}
    elif not service and not namespace:
        want = {grpc.StatusCode.OK}
    elif not service_ok(service) or not namespace_ok(namespace):
        want = {grpc.StatusCode.INVALID_ARGUMENT}
    elif (namespace, service) in TRACKED:
        want = {grpc.StatusCode.OK}
    else:
        want = {grpc.StatusCode.NOT_FOUND}
    assert code in want, (code, details)


endpoint_loads = st.builds(
    pb.EndpointLoad,
    ip=st.one_of(st.sampled_from(["10.0.0.1", "::1", ""]), st.text(max_size=40)),
    port=st.integers(0, 2**32 - 1),
    outstanding=st.integers(0, 2**32 - 1),
    latency_ms=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(-1.0)),
    calls=st.integers(0, 2**32 - 1),
)


@settings(FUZZ, max_examples=150)
@given(
    service=services,
    namespace=namespaces,
    port=ports,
    client_id=st.text(max_size=100),
    interval=st.integers(0, 2**32 - 1),
    loads=st.lists(endpoint_loads, max_size=30),
)
def test_fuzz_report_load(
    target: Target,
    service: str,
    namespace: str,
    port: str,
    client_id: str,
    interval: int,
    loads: list[pb.EndpointLoad],
) -> None:
    report = pb.LoadReport(
        service=service,
        namespace=namespace,
        port=port,
        client_id=client_id,
        interval_ms=interval,
        endpoints=loads,
    )
    code, details, _ = call(target.stub.ReportLoad, report)
    assert code in TYPED_OK | {grpc.StatusCode.UNIMPLEMENTED}, (code, details)
    if code is grpc.StatusCode.OK:
        assert service_ok(service) and namespace_ok(namespace)


def test_huge_fields_up_to_the_message_limit(target: Target) -> None:
    """Strings up to just under (and over) the 4 MiB message limit in every field: INVALID_ARGUMENT (or
    RESOURCE_EXHAUSTED over the limit), with a short message and the BadRequest detail intact."""
    from lookaside_dev.server_helpers import bad_field  # noqa: PLC0415

    limit = LIMIT["bytes"]
    for size in sorted({64, 9_000, min(1_000_000, limit - 300), limit - 300, limit + 10}):
        for fill in ("a", "\x00", "\U0001f600"):
            n = size // len(fill.encode())
            for field in ("service", "namespace", "port"):
                kw = {"service": "greet", "namespace": "default", field: fill * n}
                code, details, _ = call(target.stub.Resolve, pb.Request(**kw), timeout=10)
                if size > limit:
                    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (size, fill, field, code)
                    continue
                assert code is grpc.StatusCode.INVALID_ARGUMENT, (size, fill, field, code, details[:200])
                assert len(details.encode()) <= 1100
                try:
                    target.stub.Resolve(pb.Request(**kw), timeout=10)
                except grpc.RpcError as e:
                    assert bad_field(e) == field  # type: ignore[arg-type]
            if size <= limit:
                watch = target.stub.Watch(pb.WatchRequest(service=fill * n, namespace="default"), timeout=10)
                with pytest.raises(grpc.RpcError) as err:
                    next(iter(watch))
                assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    target.assert_intact()


# --- raw message bytes ----------------------------------------------------------------------------------

METHODS = {
    "Resolve": "unary",
    "Status": "unary",
    "ReportLoad": "unary",
    "Watch": "stream",
}


@settings(FUZZ, max_examples=300)
@given(
    method=st.sampled_from(sorted(METHODS)),
    body=st.one_of(
        st.binary(max_size=300),
        st.sampled_from(
            [
                b"\xff" * 10,
                b"\x08",
                b"\x0a\x80\x80\x80\x80\x10",
                b"\x12\x02\xc3\x28",
                b"\x0a\xff\xff\xff\xff\x0f",
                b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
                b"\x28\xff\xff\xff\xff\x0f",
                b"\x0b\x0c",
                b"\x0f",
                b"\x00\x00",
            ]
        ),
    ),
)
def test_fuzz_raw_message_bytes(target: Target, method: str, body: bytes) -> None:
    path = f"/lookaside.Lookaside/{method}"
    start = time.monotonic()
    if METHODS[method] == "unary":
        fn = target.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        code, details, _ = call(fn, body)
    else:
        stream = target.channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
            body, timeout=CALL_TIMEOUT
        )
        try:
            next(iter(stream))
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        finally:
            stream.cancel()
        assert time.monotonic() - start < CALL_TIMEOUT + 1.0
    allowed = TYPED_OK | ({grpc.StatusCode.UNIMPLEMENTED} if method == "ReportLoad" else set())
    # A body that does not parse is the caller's mistake: INVALID_ARGUMENT (never grpc.aio's bare UNKNOWN).
    assert code in allowed, (method, body, code, details)


def test_state_intact_after_the_typed_and_raw_fuzzing(target: Target) -> None:
    target.assert_intact()


# --- raw HTTP/2 -----------------------------------------------------------------------------------------


def _attacks() -> dict[str, list[bytes]]:
    ok_body = pb.Request(service="greet", namespace="default").SerializeToString()
    hdrs = grpc_request_headers()
    rng = random.Random(6)
    settings_frame = frame(SETTINGS, 0, 0)
    start = [PREFACE, settings_frame]
    attacks: dict[str, list[bytes]] = {
        "nothing then close": [],
        "http/1.1 request": [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
        "tls client hello": [
            bytes.fromhex("160301002a010000260303") + bytes(32) + b"\x00\x00\x02\x00\x2f\x01\x00"
        ],
        "half a preface": [PREFACE[:10]],
        "preface then junk": [PREFACE, bytes(rng.randrange(256) for _ in range(500))],
        "frame larger than max size": start + [frame(DATA, 0, 1, b"x" * 100, length=16_000_000)],
        "truncated frame header": start + [b"\x00\x00\x05\x01"],
        "data on stream 0": start + [frame(DATA, 0, 0, b"xyz")],
        "headers on stream 0": start + [frame(HEADERS, END_HEADERS, 0, hdrs)],
        "garbage hpack": start
        + [frame(HEADERS, END_HEADERS, 1, bytes(rng.randrange(256) for _ in range(200)))],
        "hpack index out of range": start + [frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f")],
        "continuation without headers": start + [frame(CONTINUATION, END_HEADERS, 1, hdrs)],
        "headers without end_headers": start + [frame(HEADERS, 0, 1, hdrs), frame(DATA, 0, 1, b"x")],
        "bad settings values": [
            PREFACE,
            frame(SETTINGS, 0, 0, b"\x00\x04\xff\xff\xff\xff\x00\x05\x00\x00\x00\x01"),
        ],
        "settings of odd length": [PREFACE, frame(SETTINGS, 0, 0, b"\x00\x01\x02")],
        "zero window update": start + [frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00")],
        "window overflow": start + [frame(WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff")] * 3,
        "rst on idle stream": start + [frame(RST_STREAM, 0, 7, b"\x00\x00\x00\x08")],
        "priority on itself": start + [frame(PRIORITY, 0, 3, b"\x00\x00\x00\x03\x10")],
        "ping flood": start + [frame(PING, 0, 0, bytes(8))] * 2000,
        "goaway then request": start + [frame(GOAWAY, 0, 0, bytes(8)), frame(HEADERS, END_HEADERS, 1, hdrs)],
        "unknown frame types": start + [frame(0xEE, 0xFF, 5, b"?" * 50) for _ in range(20)],
        "even stream id": start + [frame(HEADERS, END_HEADERS, 2, hdrs)],
        "decreasing stream ids": start
        + [frame(HEADERS, END_HEADERS, 5, hdrs), frame(HEADERS, END_HEADERS, 3, hdrs)],
        "truncated grpc message then close": start
        + [
            frame(HEADERS, END_HEADERS, 1, hdrs),
            frame(DATA, 0, 1, grpc_message(b"\x0a\x05gr", declared=100)),
        ],
        "truncated grpc message with end_stream": start
        + [
            frame(HEADERS, END_HEADERS, 1, hdrs),
            frame(DATA, END_STREAM, 1, grpc_message(b"\x0a", declared=50)),
        ],
        "grpc message claiming 4 GiB": start
        + [
            frame(HEADERS, END_HEADERS, 1, hdrs),
            frame(DATA, END_STREAM, 1, grpc_message(b"", declared=2**32 - 1)),
        ],
        "compressed flag without encoding": start
        + [
            frame(HEADERS, END_HEADERS, 1, hdrs),
            frame(DATA, END_STREAM, 1, b"\x01" + grpc_message(ok_body)[1:]),
        ],
        "wrong content-type": start
        + [
            frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                hpack_literal(
                    [
                        (":method", "POST"),
                        (":scheme", "http"),
                        (":path", "/lookaside.Lookaside/Resolve"),
                        (":authority", "x"),
                        ("content-type", "text/plain"),
                    ]
                ),
            )
        ],
        "GET on a method": start
        + [
            frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                hpack_literal(
                    [
                        (":method", "GET"),
                        (":scheme", "http"),
                        (":path", "/lookaside.Lookaside/Resolve"),
                        (":authority", "x"),
                    ]
                ),
            )
        ],
        "unknown path": start
        + [
            frame(HEADERS, END_HEADERS, 1, grpc_request_headers("/x.Y/Z")),
            frame(DATA, END_STREAM, 1, grpc_message(ok_body)),
        ],
        "huge header": start
        + [frame(HEADERS, END_HEADERS, 1, hdrs + hpack_literal([("x-big", "v" * 60_000)]))],
        "many streams never finished": start
        + [frame(HEADERS, END_HEADERS, 2 * i + 1, hdrs) for i in range(300)],
    }
    for i in range(12):  # seeded random junk after a valid preface and settings
        attacks[f"random frames #{i}"] = start + [
            frame(
                rng.randrange(12),
                rng.randrange(256),
                rng.randrange(9),
                bytes(rng.randrange(256) for _ in range(rng.randrange(64))),
            )
            for _ in range(rng.randrange(1, 30))
        ]
    return attacks


def test_garbage_and_truncated_http2_on_a_raw_socket(target: Target) -> None:
    host, port = target.address.rsplit(":", 1)
    addr = (host, int(port))
    for name, chunks in _attacks().items():
        for linger in (False, True):
            try:
                send_raw(addr, chunks, read_for=0.05, linger=linger)
            except OSError as e:  # the server may reset us: fine, as long as it keeps serving
                assert not isinstance(e, ConnectionRefusedError), f"{name}: server gone"
        code, _, resp = call(target.stub.Resolve, pb.Request(service="greet", namespace="default"))
        assert code is grpc.StatusCode.OK, f"not serving after {name!r}"
    target.assert_intact()


def test_a_hand_made_grpc_request_over_raw_http2_is_answered(target: Target) -> None:
    """Control for the raw attacks: the frames built by hand do reach the gRPC layer."""
    host, port = target.address.rsplit(":", 1)
    body = pb.Request(service="greet", namespace="default", count=2).SerializeToString()
    got = send_raw(
        (host, int(port)),
        [
            PREFACE,
            frame(SETTINGS, 0, 0),
            frame(HEADERS, END_HEADERS, 1, grpc_request_headers()),
            frame(DATA, END_STREAM, 1, grpc_message(body)),
        ],
        read_for=1.0,
    )
    on_stream = [(t, f) for t, f, s, _ in frames_of(got) if s == 1]
    assert (HEADERS, END_HEADERS) in on_stream or any(t == HEADERS for t, _ in on_stream), frames_of(got)
    assert any(t == DATA for t, _ in on_stream), "no response message"
    assert any(t == HEADERS and f & END_STREAM for t, f in on_stream), "no trailers"


def test_idle_and_stalled_connections_do_not_block_others(target: Target) -> None:
    """200 sockets open: half idle, half stalled mid-request; well-formed clients are still served fast."""
    host, port = target.address.rsplit(":", 1)
    socks: list[socket.socket] = []
    try:
        for i in range(200):
            s = socket.create_connection((host, int(port)), timeout=2)
            if i % 2:
                s.sendall(
                    PREFACE
                    + frame(SETTINGS, 0, 0)
                    + frame(HEADERS, END_HEADERS, 1, grpc_request_headers())
                    + frame(DATA, 0, 1, grpc_message(b"\x0a", declared=1000))
                )
            socks.append(s)
        start = time.monotonic()
        for _ in range(50):
            code, _, _ = call(target.stub.Resolve, pb.Request(service="greet", namespace="default"))
            assert code is grpc.StatusCode.OK
        assert time.monotonic() - start < 5.0
    finally:
        for s in socks:
            s.close()
    target.assert_intact()
