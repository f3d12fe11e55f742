"""Transport security of the gRPC port: TLS, optionally mutual TLS, reloaded from disk without a restart.

The certificate, key and client CA are files (a mounted Kubernetes Secret: symlinks swapped atomically on
every update). :func:`server_credentials` gives ``grpc.dynamic_ssl_server_credentials`` whose fetcher grpc
calls on new handshakes: it re-reads the files (at most every ``check_interval`` seconds), and when their
content changed and the new set is consistent (the key matches the certificate, the CA parses) it hands grpc
the new configuration. Connections already open keep the old certificate; a broken or half-written update
is logged and ignored (the last good set stays in use) and retried on later handshakes.

A certificate that must not be served is refused (:class:`TlsRefused`), at start (the server does not start;
the CLI exits 2) and on rotation (the current certificate stays, the refusal is logged once per file set and
counted): expired, not yet valid, a CA certificate, or one whose key usage / extended key usage does not
allow TLS server authentication. A not-yet-valid set is looked at again on later checks and taken once it is
valid.

Key material is never logged: log lines name the files and the SHA-256 fingerprint of the certificate.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger(__name__)

#: Seconds between looks at the files (grpc asks on every new handshake; this bounds the file reads).
DEFAULT_CHECK_INTERVAL = 1.0


class TlsError(ValueError):
    """The TLS files cannot be used (unreadable, not PEM, key not matching the certificate)."""


class _Unstable(TlsError):
    """The files changed while being read (a rotation in progress): look again on the next check."""


#: Why a certificate is refused (:attr:`TlsRefused.reason`).
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
USAGE = "usage"


class TlsRefused(TlsError):
    """A readable certificate that must not be served: expired, not yet valid, or not for TLS servers."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        #: One of EXPIRED, NOT_YET_VALID, USAGE.
        self.reason = reason


_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}


def _when(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def check_server_certificate(cert_pem: bytes, where: str, now: datetime.datetime | None = None) -> None:
    """Raise :class:`TlsRefused` unless the first certificate of ``cert_pem`` (the leaf) may be served now:
    within its validity period, not a CA certificate, and its key usage and extended key usage (when
    present) allow TLS server authentication. :class:`TlsError` if it is not a PEM certificate chain."""
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except (ValueError, IndexError):
        raise TlsError(f"TLS certificate {where} is not a PEM certificate chain") from None
    now = now or datetime.datetime.now(datetime.UTC)
    what = f"TLS certificate {where} (sha256 {fingerprint(cert_pem)})"
    if leaf.not_valid_after_utc < now:
        raise TlsRefused(EXPIRED, f"{what} expired on {_when(leaf.not_valid_after_utc)}")
    if leaf.not_valid_before_utc > now:
        raise TlsRefused(
            NOT_YET_VALID,
            f"{what} is not valid before {_when(leaf.not_valid_before_utc)} (check the clock, or wait)",
        )
    ext = leaf.extensions
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise TlsRefused(
                USAGE, f"{what} is a CA certificate (BasicConstraints CA:TRUE), not a server certificate"
            )
    except x509.ExtensionNotFound:
        pass
    try:
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and not {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    } & set(eku):
        names = ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku) or "none"
        raise TlsRefused(
            USAGE, f"{what} is not for TLS servers: its extended key usage is {names}, without serverAuth"
        )
    try:
        ku = ext.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not (ku.digital_signature or ku.key_encipherment or ku.key_agreement):
        raise TlsRefused(
            USAGE,
            f"{what} is not for TLS servers: its key usage allows neither "
            "digitalSignature nor keyEncipherment",
        )


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate chain and key (PEM files); ``client_ca`` set = require and verify client certs."""

    cert_file: str | os.PathLike[str]
    key_file: str | os.PathLike[str]
    #: CA bundle client certificates must chain to; None = no client certificates asked for (plain TLS).
    client_ca_file: str | os.PathLike[str] | None = None
    check_interval: float = DEFAULT_CHECK_INTERVAL

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate (mutual TLS)."""
        return self.client_ca_file is not None


@dataclass(frozen=True)
class _Material:
    cert: bytes
    key: bytes
    ca: bytes | None
    digest: bytes

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], root_certificates=self.ca)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint (hex, colon-separated) of the first certificate in ``cert_pem``."""
    text = cert_pem.decode("ascii", "replace")
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        return "not a PEM certificate"
    der = ssl.PEM_cert_to_DER_cert(text[start : end + len("-----END CERTIFICATE-----")])
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"cannot read the TLS {what} {os.fspath(path)}: {e.strerror or e}") from e
    if not data.strip():
        raise TlsError(f"the TLS {what} {os.fspath(path)} is empty")
    return data


class CertificateStore:
    """The current TLS material, re-read from the files on demand (the dynamic credentials' fetcher)."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._checked = 0.0
        #: How many times new material was loaded after the first (rotations), and failed attempts (each
        #: file set counted once); ``refusals``: the failed attempts refused as expired, not yet valid or
        #: wrong usage (:class:`TlsRefused`).
        self.reloads = 0
        self.reload_errors = 0
        self.refusals = 0
        #: Digest of the last file set that failed (and whether to look at it again: not yet valid).
        self._failed: tuple[bytes, bool] | None = None
        self._material = self._load()
        self._checked = time.monotonic()
        log.info(
            "TLS: certificate %s (sha256 %s), key %s%s",
            os.fspath(config.cert_file),
            fingerprint(self._material.cert),
            os.fspath(config.key_file),
            f", client certificates required (CA {os.fspath(config.client_ca_file)})"
            if config.client_ca_file is not None
            else ", no client certificates",
        )

    @property
    def cert_fingerprint(self) -> str:
        """Fingerprint of the certificate in use now."""
        return fingerprint(self._material.cert)

    def _read_all(self) -> tuple[bytes, bytes, bytes | None]:
        c = self.config
        ca = _read(c.client_ca_file, "client CA") if c.client_ca_file is not None else None
        return _read(c.cert_file, "certificate"), _read(c.key_file, "key"), ca

    @staticmethod
    def _digest(files: tuple[bytes, bytes, bytes | None]) -> bytes:
        cert, key, ca = files
        return hashlib.sha256(b"\0".join((cert, key, ca or b""))).digest()

    def _load(self, first: tuple[bytes, bytes, bytes | None] | None = None) -> _Material:
        """Read and check the files; raise TlsError (with a message free of key material) if unusable,
        TlsRefused if the certificate must not be served."""
        first = first or self._read_all()
        c = self.config
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(os.fspath(c.cert_file), os.fspath(c.key_file), password=b"")
        except (ssl.SSLError, OSError) as e:
            raise TlsError(
                f"TLS certificate {os.fspath(c.cert_file)} and key {os.fspath(c.key_file)} are "
                f"not a usable pair (PEM, unencrypted key matching the certificate): "
                f"{getattr(e, 'reason', None) or type(e).__name__}"
            ) from None
        if c.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=os.fspath(c.client_ca_file))
            except (ssl.SSLError, OSError) as e:
                raise TlsError(
                    f"TLS client CA {os.fspath(c.client_ca_file)} is not a PEM CA bundle: "
                    f"{getattr(e, 'reason', None) or type(e).__name__}"
                ) from None
        # The files may have been swapped between our read and the check: only accept a stable set.
        if self._read_all() != first:
            raise _Unstable("the TLS files changed while being read")
        cert, key, ca = first
        check_server_certificate(cert, os.fspath(c.cert_file))
        return _Material(cert, key, ca, self._digest(first))

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The configuration to start with."""
        return self._material.configuration()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher: a new configuration if the files' content changed, else None (keep the current)."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.config.check_interval:
                return None
            self._checked = now
            digest: bytes | None = None
            try:
                files = self._read_all()
                digest = self._digest(files)
                if digest == self._material.digest:
                    return None
                if self._failed is not None and self._failed == (digest, False):
                    return None  # already refused and logged; not looked at again until the files change
                seen = self._failed is not None and self._failed[0] == digest
                material = self._load(files)
            except _Unstable:
                return None
            except TlsRefused as e:
                assert digest is not None
                self._failed = (digest, e.reason == NOT_YET_VALID)
                if not seen:
                    self.reload_errors += 1
                    self.refusals += 1
                    log.warning(
                        "TLS files changed but the certificate is refused, keeping the current one: %s", e
                    )
                return None
            except TlsError as e:
                if digest is not None:
                    if self._failed == (digest, False):
                        return None
                    self._failed = (digest, False)  # logged and counted once per file set
                self.reload_errors += 1
                log.warning("TLS files changed but cannot be used, keeping the current certificate: %s", e)
                return None
            except Exception as e:  # noqa: BLE001 - never break handshakes because of a reload
                self.reload_errors += 1
                log.warning("TLS reload failed, keeping the current certificate: %s", type(e).__name__)
                return None
            self._failed = None
            if material.digest == self._material.digest:
                return None
            old = self._material
            self._material = material
            self.reloads += 1
        log.info(
            "TLS: reloaded %s: certificate sha256 %s (was %s)",
            os.fspath(self.config.cert_file),
            fingerprint(material.cert),
            fingerprint(old.cert),
        )
        return material.configuration()


def server_credentials(config: TlsConfig) -> tuple[grpc.ServerCredentials, CertificateStore]:
    """Dynamic TLS credentials for ``config`` and the store behind them; raise TlsError if unusable now."""
    store = CertificateStore(config)
    creds = grpc.dynamic_ssl_server_credentials(
        store.initial(), store.fetch, require_client_authentication=config.mutual
    )
    return creds, store


def tls_config_from(
    cert: str | None, key: str | None, client_ca: str | None, check_interval: float = DEFAULT_CHECK_INTERVAL
) -> TlsConfig | None:
    """The TLS config the flags ask for (None: plaintext); ValueError if they are incomplete."""
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca (LB_TLS_CLIENT_CA) needs --tls-cert and --tls-key")
        return None
    if not cert or not key:
        raise ValueError("TLS needs both --tls-cert (LB_TLS_CERT) and --tls-key (LB_TLS_KEY)")
    return TlsConfig(cert, key, client_ca or None, check_interval)
