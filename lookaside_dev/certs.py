"""Test PKI: a CA, server and client certificates (ECDSA P-256) made with ``cryptography``, as PEM bytes."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_DNS = ("localhost", "lookaside.default.svc")
GOOD_SPIFFE = "spiffe://cluster.local/ns/default/sa/greet-client"
BAD_SPIFFE = "spiffe://cluster.local/ns/other/sa/intruder"


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, PEM-encoded."""

    cert: bytes
    key: bytes


@dataclass(frozen=True)
class CA:
    """A self-signed certificate authority that issues leaf certificates."""

    name: str
    cert: bytes
    _key: ec.EllipticCurvePrivateKey
    _cert: x509.Certificate

    def issue(
        self,
        common_name: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        server: bool = True,
        client: bool = True,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        ca: bool = False,
    ) -> KeyPair:
        """A leaf certificate for ``common_name`` with the given SANs, signed by this CA.

        ``server``/``client``: the extended key usages (serverAuth, clientAuth); ``not_before``/``not_after``
        the validity period (default: from 5 minutes ago for a day); ``ca``: mark it a CA certificate
        (BasicConstraints ca=True), which a server must not present."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after or now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(name: str = "lookaside test CA") -> CA:
    """A new self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return CA(name, cert.public_bytes(serialization.Encoding.PEM), key, cert)


def server_pair(ca: CA, *dns: str) -> KeyPair:
    """A server certificate for 127.0.0.1, localhost and lookaside.default.svc (plus ``dns``)."""
    return ca.issue("lookaside", dns=SERVER_DNS + dns, ips=("127.0.0.1",), client=False)


def expired_server_pair(ca: CA) -> KeyPair:
    """A server certificate (as :func:`server_pair`) that expired an hour ago."""
    now = datetime.datetime.now(datetime.UTC)
    return ca.issue(
        "lookaside",
        dns=SERVER_DNS,
        ips=("127.0.0.1",),
        client=False,
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(hours=1),
    )


def future_server_pair(ca: CA) -> KeyPair:
    """A server certificate (as :func:`server_pair`) valid only from tomorrow."""
    now = datetime.datetime.now(datetime.UTC)
    return ca.issue(
        "lookaside",
        dns=SERVER_DNS,
        ips=("127.0.0.1",),
        client=False,
        not_before=now + datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=2),
    )


def client_pair(ca: CA, uri: str = GOOD_SPIFFE, dns: tuple[str, ...] = ()) -> KeyPair:
    """A client certificate whose identity is the SAN URI ``uri`` (and DNS names ``dns``)."""
    return ca.issue("client", uris=(uri,) if uri else (), dns=dns, server=False)


class SecretDir:
    """Files laid out as Kubernetes mounts a Secret: ``dir/<name>`` -> ``..data/<name>``, ``..data`` a symlink
    to a timestamped directory, swapped atomically (rename of a new symlink) on every update."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._generation = 0

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, files: dict[str, bytes]) -> None:
        """Publish a new generation of ``files`` with one atomic symlink swap."""
        self._generation += 1
        gen = self.root / f"..gen{self._generation}"
        gen.mkdir()
        for name, data in files.items():
            (gen / name).write_bytes(data)
        tmp = self.root / "..data_tmp"
        os.symlink(gen.name, tmp)
        os.replace(tmp, self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
