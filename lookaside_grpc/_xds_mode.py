"""xDS mode: ``channel(..., mode="xds")`` builds grpc's own ``xds:///<target>`` channel, bootstrapped to the
lookaside (its ADS control plane), so C-core resolves and picks: a call does no Python work beyond grpc's own.

The bootstrap is process-wide. grpcio reads ``GRPC_XDS_BOOTSTRAP`` (a file) or ``GRPC_XDS_BOOTSTRAP_CONFIG``
(inline JSON) when its xDS client is created (the first xds channel of the process). Its only per-channel
alternative, the channel argument ``grpc.TEST_ONLY_DO_NOT_USE_IN_PROD.xds_bootstrap_config``, works in grpcio
1.85 but is marked test-only by grpc (one private xDS client per channel, CSDS broken, no stability promise),
so the library sets ``GRPC_XDS_BOOTSTRAP_CONFIG`` in this process at first use and refuses a second,
different lookaside address (or a bootstrap the application set itself for another server).

The client's zone (``zone=``, default ``$LOOKASIDE_ZONE``, as for the Python policies) goes into the
bootstrap's ``node.locality.zone``, from which the lookaside serves zone-aware endpoints (local zone first);
being process-wide too, a second channel naming another zone is refused.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypedDict

import grpc
import grpc.aio

from lookaside_grpc._settings import (
    OPTION_NAMES,
    XDS,
    Options,
    OptionValue,
    Xds,
    XdsModeName,
    backend_options,
    default_lookaside,
    is_xds,
    make_target,
)
from lookaside_grpc._target import Target

__all__ = [
    "XDS",
    "AioXdsChannel",
    "Xds",
    "XdsChannel",
    "XdsModeName",
    "XdsOptions",
    "XdsSettings",
    "ensure_bootstrap",
    "is_xds",
    "xds_settings",
]

BOOTSTRAP_ENV = "GRPC_XDS_BOOTSTRAP"
BOOTSTRAP_CONFIG_ENV = "GRPC_XDS_BOOTSTRAP_CONFIG"

#: The shared options that mean something in xds mode (C-core dials and picks; the rest is refused).
XDS_OPTION_NAMES = frozenset({"mode", "credentials", "options", "tls_server_name", "zone"})
#: Factory arguments that do nothing in xds mode (a call waits as on any grpc channel).
_REFUSED_HINTS = {
    "policy": "the Cluster's (the lookaside's --xds-lb-policy or --xds-hash-header), picked by C-core",
    "max_staleness": "grpc's xDS client keeps the last resources while the control plane is away",
    "lookaside_keepalive": "grpc's xDS client manages its own ADS stream",
    "lookaside_credentials": "the bootstrap's channel_creds: set GRPC_XDS_BOOTSTRAP yourself for TLS",
    "init_timeout": "calls wait as on any grpc channel (wait_for_ready, deadlines)",
    "hash_key": "the hash header is the lookaside's --xds-hash-header (the Cluster's RING_HASH)",
}


class XdsOptions(TypedDict, total=False):
    """The options ``channel(..., mode="xds")`` takes: ``credentials``/``options``/``tls_server_name`` of the
    connections to the backends (grpc's own xds channel); ``zone``: the client's zone, for the lookaside's
    zone-aware endpoints (default ``$LOOKASIDE_ZONE``; ``""`` = none)."""

    credentials: grpc.ChannelCredentials | None
    options: Options
    tls_server_name: str | None
    zone: str | None


@dataclass(frozen=True, slots=True)
class XdsSettings:
    """What an xds-mode channel was built from."""

    target: Target
    lookaside: str
    xds_target: str
    options: tuple[tuple[str, OptionValue], ...]
    #: The client's zone, sent in the bootstrap (``node.locality.zone``); "" = none.
    zone: str = ""


_lock = threading.Lock()
_bootstrapped: str | None = None  # the lookaside address this process's xDS bootstrap names
_zone = ""  # the zone it names


def bootstrap_config(lookaside: str, zone: str = "") -> str:
    """The xDS bootstrap (JSON) naming the lookaside as the ADS server (plaintext) and, if given, the
    client's zone (``node.locality.zone``)."""
    node: dict[str, Any] = {
        "id": f"lookaside-grpc/{socket.gethostname()}/{os.getpid()}",
        "cluster": "lookaside-grpc",
    }
    if zone:
        node["locality"] = {"zone": zone}
    return json.dumps(
        {
            "xds_servers": [
                {
                    "server_uri": lookaside,
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }
            ],
            "node": node,
        }
    )


def _zone_of(text: str) -> str:
    try:
        zone = json.loads(text)["node"]["locality"]["zone"]
    except (ValueError, KeyError, TypeError):
        return ""
    return zone if isinstance(zone, str) else ""


def _server_of(text: str) -> str | None:
    try:
        servers = json.loads(text).get("xds_servers") or [{}]
        uri = servers[0].get("server_uri")
    except (ValueError, AttributeError, TypeError, IndexError):
        return None
    return uri if isinstance(uri, str) else None


def _same_address(a: str, b: str) -> bool:
    def norm(x: str) -> str:
        for prefix in ("dns:///", "ipv4:", "ipv6:"):
            x = x.removeprefix(prefix)
        return x

    return norm(a) == norm(b)


def ensure_bootstrap(lookaside: str, zone: str = "") -> None:
    """Point this process's grpc xDS client at ``lookaside`` (once), in ``zone``; refuse a conflicting
    bootstrap (another server, or another zone than the first channel's or the application's bootstrap's)."""
    global _bootstrapped, _zone
    with _lock:
        if _bootstrapped is not None:
            if not _same_address(_bootstrapped, lookaside):
                raise ValueError(
                    f"xds mode: this process already uses the lookaside {_bootstrapped!r} for xDS; grpc reads"
                    f" one xDS bootstrap per process, so {lookaside!r} cannot be used too (use mode='watch')"
                )
            if zone and zone != _zone:
                raise ValueError(
                    f"xds mode: this process's xDS bootstrap names zone {_zone!r}; grpc reads one xDS "
                    f"bootstrap per process, so zone {zone!r} cannot be used too"
                )
            return
        path = os.environ.get(BOOTSTRAP_ENV)
        given = os.environ.get(BOOTSTRAP_CONFIG_ENV)
        if path:
            try:
                with open(path) as f:
                    given, source = f.read(), f"{BOOTSTRAP_ENV}={path}"
            except OSError as e:
                raise ValueError(f"xds mode: {BOOTSTRAP_ENV}={path} cannot be read: {e}") from e
        else:
            source = BOOTSTRAP_CONFIG_ENV
        if given:
            server = _server_of(given)
            if server is None or not _same_address(server, lookaside):
                raise ValueError(
                    f"xds mode: {source} names the xDS server {server!r}, not the lookaside {lookaside!r}; "
                    "grpc reads one xDS bootstrap per process"
                )
            given_zone = _zone_of(given)  # the application's bootstrap wins; only a contradiction is refused
            if zone and given_zone and zone != given_zone:
                raise ValueError(
                    f"xds mode: {source} names zone {given_zone!r} (node.locality.zone), not {zone!r}; "
                    "grpc reads one xDS bootstrap per process"
                )
            zone = given_zone
        else:
            os.environ[BOOTSTRAP_CONFIG_ENV] = bootstrap_config(lookaside, zone)
        _bootstrapped, _zone = lookaside, zone


def xds_settings(
    target: Target | str,
    namespace: str | None,
    port: str | int | None,
    lookaside: str | None,
    init_timeout: float | None,
    options: Mapping[str, object],
) -> XdsSettings:
    """Validate an xds-mode factory's arguments (knobs that would do nothing there are a ValueError)."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    refused = sorted(set(options) - XDS_OPTION_NAMES) + (["init_timeout"] if init_timeout is not None else [])
    if refused:
        why = "; ".join(f"{name}: {_REFUSED_HINTS.get(name, 'not an option')}" for name in refused)
        raise ValueError(f"xds mode does not take {', '.join(map(repr, refused))} ({why})")
    if lookaside is not None and not isinstance(lookaside, str):
        raise TypeError(f"lookaside must be an address string, got {lookaside!r}")
    t = make_target(target, namespace, port)
    o: XdsOptions = options  # type: ignore[assignment]
    opts = backend_options(t, o.get("credentials"), o.get("options", ()), o.get("tls_server_name"))
    opts = tuple((str(k), v) for k, v in opts)
    zone = o.get("zone")
    if zone is None:
        zone = os.environ.get("LOOKASIDE_ZONE", "")
    if not isinstance(zone, str):
        raise TypeError(f"zone must be a string, got {zone!r}")
    return XdsSettings(t, lookaside or default_lookaside(), f"xds:///{t}", opts, zone)


class XdsChannel(grpc.Channel):
    """grpc's own ``xds:///`` channel; the multicallables are grpc's (no per-call Python work of ours)."""

    def __init__(self, settings: XdsSettings, credentials: grpc.ChannelCredentials | None) -> None:
        self.settings = settings
        ensure_bootstrap(settings.lookaside, settings.zone)
        if credentials is None:
            self._channel = grpc.insecure_channel(settings.xds_target, options=settings.options)
        else:
            self._channel = grpc.secure_channel(settings.xds_target, credentials, options=settings.options)

    @property
    def grpc_channel(self) -> grpc.Channel:
        """The underlying grpc channel."""
        return self._channel

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        self._channel.unsubscribe(callback)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_stream(method, *args, **kwargs)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> XdsChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AioXdsChannel(grpc.aio.Channel):
    """grpc.aio's own ``xds:///`` channel; the multicallables are grpc's."""

    def __init__(self, settings: XdsSettings, credentials: grpc.ChannelCredentials | None) -> None:
        self.settings = settings
        ensure_bootstrap(settings.lookaside, settings.zone)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(settings.xds_target, options=settings.options)
        else:
            self._channel = grpc.aio.secure_channel(
                settings.xds_target, credentials, options=settings.options
            )

    @property
    def grpc_channel(self) -> grpc.aio.Channel:
        """The underlying grpc.aio channel."""
        return self._channel

    async def __aenter__(self) -> AioXdsChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_stream(method, *args, **kwargs)
