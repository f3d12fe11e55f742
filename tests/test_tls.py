"""TLS and mutual TLS on the lookaside port, rotation without restart, identity rule, TLS to the backends."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lookaside_grpc
import lookaside_grpc.aio
from examples.greet import greet_pb2, greet_pb2_grpc
from examples.greet.server import GreetServicer
from lookaside_dev.certs import (
    BAD_SPIFFE,
    CA,
    GOOD_SPIFFE,
    KeyPair,
    SecretDir,
    client_pair,
    expired_server_pair,
    future_server_pair,
    make_ca,
    server_pair,
)
from lookaside_dev.server_helpers import endpoints
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb
from lookaside_grpc._cli import run as cli_run
from lookaside_server import (
    AccessConfig,
    ListenConfig,
    LookasideServer,
    SecurityConfig,
    ServerConfig,
    StaticFileConfig,
    run_in_thread,
)
from lookaside_server._security.tls import (
    EXPIRED,
    NOT_YET_VALID,
    USAGE,
    TlsConfig,
    TlsError,
    TlsRefused,
    check_server_certificate,
    fingerprint,
    tls_config_from,
)
from lookaside_server._web.logging import JsonFormatter, make_handler

T = "default/greet"
RESOLVE = pb.Request(router=pb.ROUNDROBIN, service="greet", namespace="default")
LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]


class Pki:
    """A CA with server and client certificates, written as a mounted Kubernetes Secret."""

    def __init__(self, root: Path) -> None:
        self.ca = make_ca()
        self.server = server_pair(self.ca)
        self.client = client_pair(self.ca)
        self.secret = SecretDir(root / "secret")
        self.publish(self.ca, self.server)

    def publish(self, ca: CA, pair: KeyPair) -> None:
        self.secret.write({"tls.crt": pair.cert, "tls.key": pair.key, "ca.crt": ca.cert})

    def config(self, mutual: bool = False) -> TlsConfig:
        return TlsConfig(
            self.secret.path("tls.crt"),
            self.secret.path("tls.key"),
            self.secret.path("ca.crt") if mutual else None,
            check_interval=0.0,
        )


def creds(ca: CA, pair: KeyPair | None = None) -> grpc.ChannelCredentials:
    if pair is None:
        return grpc.ssl_channel_credentials(ca.cert)
    return grpc.ssl_channel_credentials(ca.cert, pair.key, pair.cert)


@asynccontextmanager
async def tls_server(
    tmp_path: Path, tls: TlsConfig, access: AccessConfig | None = None, **config: Any
) -> AsyncIterator[LookasideServer]:
    path = tmp_path / "endpoints.json"
    write_static(path, config.pop("data", {T: endpoints(2)}))
    server = LookasideServer(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, grace=0.5),
            source=StaticFileConfig(str(path), poll_interval=0.05),
            security=SecurityConfig(tls=tls, access=access or AccessConfig()),
            **config,
        )
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0.5)


async def resolve(
    port: int,
    credentials: grpc.ChannelCredentials | None,
    timeout: float = 5.0,
    request: pb.Request = RESOLVE,
) -> pb.Response:
    """One Resolve on a fresh channel (its own subchannel pool: no connection reuse between attempts)."""
    address = f"127.0.0.1:{port}"
    channel = (
        grpc.aio.insecure_channel(address, options=LOCAL_POOL)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials, options=LOCAL_POOL)
    )
    async with channel:
        return await pb.LookasideStub(channel).Resolve(request, timeout=timeout)


async def test_resolve_over_tls(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with tls_server(tmp_path, pki.config()) as server:
        resp = await resolve(server.port, creds(pki.ca))
        assert resp.port in (50051, 50052)
        assert server.tls is not None and server.tls.cert_fingerprint == fingerprint(pki.server.cert)
        # a client presenting a certificate is fine too when the server does not ask for one
        assert (await resolve(server.port, creds(pki.ca, pki.client))).port in (50051, 50052)


async def test_plaintext_client_fails_and_server_keeps_serving(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with tls_server(tmp_path, pki.config()) as server:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await resolve(server.port, None, timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (await resolve(server.port, creds(pki.ca))).port in (50051, 50052)


async def test_client_not_trusting_the_server_ca_fails(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with tls_server(tmp_path, pki.config()) as server:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await resolve(server.port, creds(make_ca("someone else")), timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_requires_a_client_certificate_from_the_ca(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with tls_server(tmp_path, pki.config(mutual=True)) as server:
        with pytest.raises(grpc.aio.AioRpcError) as e:  # no client certificate: handshake fails
            await resolve(server.port, creds(pki.ca), timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = client_pair(make_ca("rogue CA"))
        with pytest.raises(grpc.aio.AioRpcError) as e:  # a certificate from another CA
            await resolve(server.port, creds(pki.ca, stranger), timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (await resolve(server.port, creds(pki.ca, pki.client))).port in (50051, 50052)


async def test_mtls_identity_rule(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    bad = client_pair(pki.ca, BAD_SPIFFE)
    dns_client = client_pair(pki.ca, "", dns=("ops.tools.svc",))
    async with tls_server(
        tmp_path,
        pki.config(mutual=True),
        access=AccessConfig(client_identities=("spiffe://cluster.local/ns/default/sa/*", "*.tools.svc")),
    ) as server:
        assert (await resolve(server.port, creds(pki.ca, pki.client))).port in (50051, 50052)
        assert (await resolve(server.port, creds(pki.ca, dns_client))).port in (50051, 50052)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await resolve(server.port, creds(pki.ca, bad))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert BAD_SPIFFE in e.value.details() and "--allow-client-identity" in e.value.details()

        async with grpc.aio.secure_channel(
            f"127.0.0.1:{server.port}", creds(pki.ca, bad), options=LOCAL_POOL
        ) as ch:
            # the same rule for Watch, Status and the xDS stream ...
            watch = pb.LookasideStub(ch).Watch(
                pb.WatchRequest(service="greet", namespace="default"), timeout=5
            )
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await watch.read()
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary("/lookaside.Lookaside/Status")(b"", timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

            async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
                yield discovery_pb2.DiscoveryRequest(
                    type_url="type.googleapis.com/envoy.config.listener.v3.Listener",
                    resource_names=["greet.default"],
                )
                await asyncio.Event().wait()  # keep the request side open

            ads_stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
            ads = ads_stub.StreamAggregatedResources(requests(), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ads.read()
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # ... but health checks stay open to probes
            check = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        text = server.metrics.exposition().decode()
        assert 'lookaside_access_denied_total{reason="identity"} 4.0' in text


def test_identity_rule_needs_mutual_tls(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    path = tmp_path / "e.json"
    write_static(path, {T: endpoints(1)})
    with pytest.raises(ValueError, match="mutual TLS"):
        LookasideServer(
            ServerConfig(
                source=StaticFileConfig(path),
                security=SecurityConfig(tls=pki.config(), access=AccessConfig(client_identities=("x",))),
            )
        )
    with pytest.raises(ValueError, match="--tls-key"):
        tls_config_from("cert.pem", None, None)
    with pytest.raises(ValueError, match="needs --tls-cert"):
        tls_config_from(None, None, "ca.pem")
    assert tls_config_from(None, None, None) is None


async def test_unusable_tls_files_fail_at_start(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    other = server_pair(pki.ca)
    pki.secret.write({"tls.crt": pki.server.cert, "tls.key": other.key, "ca.crt": pki.ca.cert})
    with pytest.raises(TlsError, match="not a usable pair"):
        async with tls_server(tmp_path, pki.config()):
            pass
    with pytest.raises(TlsError, match="cannot read"):
        async with tls_server(tmp_path, TlsConfig(tmp_path / "missing.crt", tmp_path / "missing.key")):
            pass


async def eventually(attempt: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Retry ``attempt`` (a coroutine function) until it succeeds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await attempt()
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


async def test_certificate_rotation_without_restart(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with tls_server(tmp_path, pki.config(mutual=True)) as server:
        old = grpc.aio.secure_channel(
            f"127.0.0.1:{server.port}", creds(pki.ca, pki.client), options=LOCAL_POOL
        )
        old_stub = pb.LookasideStub(old)
        assert (await old_stub.Resolve(RESOLVE, timeout=5)).port
        before = server.tls.cert_fingerprint  # type: ignore[union-attr]

        # A broken update (key of another certificate) is ignored: the old certificate keeps serving.
        wrong_key = server_pair(pki.ca).key
        pki.secret.write({"tls.crt": pki.server.cert, "tls.key": wrong_key, "ca.crt": pki.ca.cert})
        assert (await resolve(server.port, creds(pki.ca, pki.client))).port
        assert server.tls.reload_errors >= 1 and server.tls.cert_fingerprint == before  # type: ignore[union-attr]

        # Rotate to a new CA (server certificate and client CA), as cert-manager renewing a Secret does.
        new_ca = make_ca("rotated CA")
        new_server, new_client = server_pair(new_ca), client_pair(new_ca)
        pki.publish(new_ca, new_server)
        resp = await eventually(lambda: resolve(server.port, creds(new_ca, new_client), timeout=2))
        assert resp.port in (50051, 50052)
        assert server.tls.cert_fingerprint == fingerprint(new_server.cert)  # type: ignore[union-attr]
        assert server.tls.reloads == 1  # type: ignore[union-attr]
        # New connections trusting only the old CA fail now ...
        with pytest.raises(grpc.aio.AioRpcError):
            await resolve(server.port, creds(pki.ca, pki.client), timeout=2)
        # ... while the connection made before the rotation keeps working.
        assert (await old_stub.Resolve(RESOLVE, timeout=5)).port
        await old.close()
        assert "lookaside_tls_reloads_total 1.0" in server.metrics.exposition().decode()


async def test_key_material_never_logged(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    stream = io.StringIO()
    handler = make_handler("json", stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        async with tls_server(
            tmp_path, pki.config(mutual=True), access=AccessConfig(client_identities=(GOOD_SPIFFE,))
        ) as server:
            await resolve(server.port, creds(pki.ca, pki.client))
            pki.secret.write(
                {
                    "tls.crt": pki.server.cert,
                    "tls.key": b"-----BEGIN PRIVATE KEY-----\nbroken",
                    "ca.crt": pki.ca.cert,
                }
            )
            await resolve(server.port, creds(pki.ca, pki.client))
            new = server_pair(pki.ca)
            pki.publish(pki.ca, new)
            await resolve(server.port, creds(pki.ca, pki.client))  # the handshake looks at the files
            assert server.tls.cert_fingerprint == fingerprint(new.cert)  # type: ignore[union-attr]
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = stream.getvalue()
    assert "TLS: reloaded" in text and "TLS files changed but cannot be used" in text
    for pair in (pki.server, pki.client, new):
        for line in pair.key.decode().splitlines():
            if "PRIVATE KEY" not in line:
                assert line not in text
    assert "PRIVATE KEY" not in text and "broken" not in text


def test_json_formatter_fields() -> None:
    record = logging.LogRecord("lookaside_server.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.target, record.peer = "default/greet", "ipv4:127.0.0.1:1"
    out = json.loads(JsonFormatter().format(record))
    assert (out["message"], out["level"], out["logger"]) == ("hello you", "WARNING", "lookaside_server.x")
    assert (out["target"], out["peer"]) == ("default/greet", "ipv4:127.0.0.1:1") and out["time"].endswith("Z")


# --- TLS to the backends -----------------------------------------------------------------------------------


def tls_greet_backend(pair: KeyPair) -> tuple[grpc.Server, int]:
    """A Greet backend on 127.0.0.1 serving TLS with ``pair`` (a certificate for a DNS name, not the IP)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(pair.key, pair.cert)]))
    greet_pb2_grpc.add_GreetServiceServicer_to_server(GreetServicer(f"127.0.0.1:{port}"), server)
    server.start()
    return server, port


def test_backend_tls_verifies_the_service_dns_name(tmp_path: Path) -> None:
    ca = make_ca()
    backend, port = tls_greet_backend(ca.issue("greet", dns=("greet.default.svc",), client=False))
    path = tmp_path / "e.json"
    write_static(path, {T: [{"ip": "127.0.0.1", "port": port}]})
    lookaside = run_in_thread(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0),
            source=StaticFileConfig(path, poll_interval=0.05),
        )
    )
    try:
        request = greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="Ada", last_name="L"))
        with lookaside_grpc.channel(
            "greet", lookaside=lookaside.address, credentials=grpc.ssl_channel_credentials(ca.cert)
        ) as ch:
            answer = greet_pb2_grpc.GreetServiceStub(ch).Greet(request, timeout=10)
            assert answer.result.startswith("Hello Ada")
        # an explicit name the certificate does not carry fails the handshake
        with lookaside_grpc.channel(
            "greet",
            lookaside=lookaside.address,
            tls_server_name="wrong.default.svc",
            credentials=grpc.ssl_channel_credentials(ca.cert),
        ) as ch:
            with pytest.raises(grpc.RpcError) as e:
                greet_pb2_grpc.GreetServiceStub(ch).Greet(request, timeout=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        lookaside.stop()
        backend.stop(None).wait(5)


async def test_aio_backend_tls_with_custom_server_name(tmp_path: Path) -> None:
    ca = make_ca()
    backend, port = tls_greet_backend(ca.issue("greet", dns=("greet.internal.example",), client=False))
    path = tmp_path / "e.json"
    write_static(path, {T: [{"ip": "127.0.0.1", "port": port}]})
    server = LookasideServer(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0),
            source=StaticFileConfig(str(path)),
        )
    )
    await server.start()
    try:
        async with lookaside_grpc.aio.channel(
            "greet",
            lookaside=f"127.0.0.1:{server.port}",
            tls_server_name="greet.internal.example",
            credentials=grpc.ssl_channel_credentials(ca.cert),
        ) as ch:
            resp = await greet_pb2_grpc.GreetServiceStub(ch).Greet(
                greet_pb2.GreetingRequest(greeting=greet_pb2.Greeting(first_name="Bo", last_name="K")),
                timeout=10,
            )
            assert resp.result.startswith("Hello Bo")
    finally:
        await server.stop(0.5)
        backend.stop(None).wait(5)


def test_backend_options_keep_the_users_own() -> None:
    from lookaside_grpc._settings import backend_options
    from lookaside_grpc.protocol import Target

    t = Target("greet", "prod")
    ssl = grpc.ssl_channel_credentials()
    assert backend_options(t, None, [("a", 1)], None) == (("a", 1),)
    assert backend_options(t, ssl, (), None) == (
        ("grpc.ssl_target_name_override", "greet.prod.svc"),
        ("grpc.default_authority", "greet.prod.svc"),
    )
    assert backend_options(t, ssl, [("grpc.default_authority", "mine")], "n") == (
        ("grpc.default_authority", "mine"),
        ("grpc.ssl_target_name_override", "n"),
    )
    assert backend_options(t, ssl, (), "") == ()


# --- the operators' CLI over mutual TLS ------------------------------------------------------------------


def test_cli_over_mutual_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = Pki(tmp_path)
    path = tmp_path / "e.json"
    write_static(path, {T: endpoints(2)})
    files = {}
    pems = (("ca.pem", pki.ca.cert), ("client.pem", pki.client.cert), ("client.key", pki.client.key))
    for name, data in pems:
        files[name] = tmp_path / name
        files[name].write_bytes(data)
    running = run_in_thread(
        ServerConfig(
            listen=ListenConfig(host="127.0.0.1", port=0),
            source=StaticFileConfig(path, poll_interval=0.05),
            security=SecurityConfig(tls=pki.config(mutual=True)),
        )
    )
    try:
        out = io.StringIO()
        args = [
            "--server",
            f"localhost:{running.port}",
            "--tls-ca",
            str(files["ca.pem"]),
            "--tls-cert",
            str(files["client.pem"]),
            "--tls-key",
            str(files["client.key"]),
        ]
        assert cli_run([*args, "resolve", "greet.default", "--json"], out=out) == 0
        assert '"port": 5005' in out.getvalue()
        # by IP, naming the Service DNS name the certificate carries
        out = io.StringIO()
        ip_args = [*args[2:], "--server", running.address, "--tls-server-name", "lookaside.default.svc"]
        assert cli_run([*ip_args, "status", "--json"], out=out) == 0
    finally:
        running.stop()


# --- certificates that must not be served: refused at start and on rotation ---------------------------------


def unfit_pairs(ca: CA) -> dict[str, tuple[KeyPair, str]]:
    """Certificates a server must not present, with the refusal reason each gets."""
    return {
        "expired": (expired_server_pair(ca), EXPIRED),
        "not yet valid": (future_server_pair(ca), NOT_YET_VALID),
        "client-only (no serverAuth)": (client_pair(ca), USAGE),
        "CA certificate": (
            ca.issue("lookaside", dns=("localhost",), ips=("127.0.0.1",), client=False, ca=True),
            USAGE,
        ),
    }


UNFIT = ["expired", "not yet valid", "client-only (no serverAuth)", "CA certificate"]


@pytest.mark.parametrize("kind", UNFIT)
async def test_unfit_certificate_is_refused_at_start(tmp_path: Path, kind: str) -> None:
    pki = Pki(tmp_path)
    pair, reason = unfit_pairs(pki.ca)[kind]
    pki.publish(pki.ca, pair)
    with pytest.raises(TlsRefused) as e:
        async with tls_server(tmp_path, pki.config()):
            pass
    assert e.value.reason == reason and "tls.crt" in str(e.value)


@pytest.mark.parametrize("kind", ["expired", "client-only (no serverAuth)", "key mismatch"])
def test_cli_refuses_unfit_certificate_with_exit_2(tmp_path: Path, kind: str) -> None:
    import subprocess
    import sys

    ca = make_ca()
    pairs = {k: p for k, (p, _) in unfit_pairs(ca).items()}
    pairs["key mismatch"] = KeyPair(server_pair(ca).cert, server_pair(ca).key)
    (tmp_path / "tls.crt").write_bytes(pairs[kind].cert)
    (tmp_path / "tls.key").write_bytes(pairs[kind].key)
    path = tmp_path / "e.json"
    write_static(path, {T: endpoints(1)})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lookaside_server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "-1",
            "--static-file",
            str(path),
            "--tls-cert",
            str(tmp_path / "tls.crt"),
            "--tls-key",
            str(tmp_path / "tls.key"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cannot start: TLS certificate" in proc.stderr and "Traceback" not in proc.stderr
    want = {
        "expired": "expired on",
        "client-only (no serverAuth)": "without serverAuth",
        "key mismatch": "not a usable pair",
    }[kind]
    assert want in proc.stderr


@pytest.mark.parametrize("kind", UNFIT)
async def test_unfit_certificate_is_refused_on_rotation(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    pki = Pki(tmp_path)
    async with tls_server(tmp_path, pki.config()) as server:
        store = server.tls
        assert store is not None
        before = store.cert_fingerprint
        pair, _ = unfit_pairs(pki.ca)[kind]
        with caplog.at_level(logging.WARNING, logger="lookaside_server"):
            pki.publish(pki.ca, pair)
            for _ in range(3):  # every new handshake looks at the files: refused once, then not again
                assert (await resolve(server.port, creds(pki.ca))).port
        assert store.cert_fingerprint == before and store.reloads == 0
        assert store.refusals == 1 and store.reload_errors == 1
        assert caplog.text.count("certificate is refused, keeping the current one") == 1
        assert "lookaside_tls_refusals_total 1.0" in server.metrics.exposition().decode()
        # a fit certificate afterwards is taken
        good = server_pair(pki.ca)
        pki.publish(pki.ca, good)
        await eventually(lambda: resolve(server.port, creds(pki.ca)))
        assert store.cert_fingerprint == fingerprint(good.cert) and store.reloads == 1


def test_not_yet_valid_certificate_is_taken_once_valid() -> None:
    """The validity check is against the current time: the same file set refused now is fine later (a
    not-yet-valid rotation is looked at again on later checks)."""
    import datetime

    pair = future_server_pair(make_ca())
    with pytest.raises(TlsRefused, match="not valid before"):
        check_server_certificate(pair.cert, "tls.crt")
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1, hours=1)
    check_server_certificate(pair.cert, "tls.crt", now=later)
    with pytest.raises(TlsError, match="not a PEM"):
        check_server_certificate(b"junk", "tls.crt")
