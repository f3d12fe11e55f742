"""``lookaside``: the operators' command-line tool for a running lookaside server (over gRPC).

    lookaside resolve greet.default --count 3
    lookaside watch greet.default:grpc
    lookaside status

Targets are written as everywhere else: service.namespace[.svc[.cluster.local]][:port].
Run ``lookaside --help`` for the exit codes; ``--json`` gives machine-readable output.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from typing import Any, NoReturn, Protocol, TextIO

import grpc

from lookaside_grpc import protocol as pb

DEFAULT_SERVER = "127.0.0.1:50055"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INVALID_ARGUMENT = 4
EXIT_PERMISSION_DENIED = 5
EXIT_UNAVAILABLE = 6
EXIT_DEADLINE = 7
EXIT_UNIMPLEMENTED = 8

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}  success (watch: also when stopped by Ctrl-C, --max-updates or --timeout)
  {EXIT_ERROR}  any other failure
  {EXIT_USAGE}  usage error (bad flags or arguments)
  {EXIT_NOT_FOUND}  NOT_FOUND: the server does not know the target (check the Service name and namespace)
  {EXIT_INVALID_ARGUMENT}  INVALID_ARGUMENT: malformed service/namespace, unknown --port or --router value
  {EXIT_PERMISSION_DENIED}  PERMISSION_DENIED: access rules refuse that namespace, Service or client
  {EXIT_UNAVAILABLE}  UNAVAILABLE: server unreachable (check --server), or the target has no ready endpoint
  {EXIT_DEADLINE}  DEADLINE_EXCEEDED: no answer in time (watch: --max-updates not reached by --timeout)
  {EXIT_UNIMPLEMENTED}  UNIMPLEMENTED: the server is too old for this command

environment:
  LOOKASIDE_ADDR  default for --server (else {DEFAULT_SERVER})
  LOOKASIDE_TLS_CA, LOOKASIDE_TLS_CERT, LOOKASIDE_TLS_KEY, LOOKASIDE_TLS_SERVER_NAME  defaults for --tls-*
"""

_ROUTERS = {"round_robin": pb.Request.ROUNDROBIN, "random": pb.Request.RANDOM}


class CliError(Exception):
    """A failure to report on stderr, ending the command with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_target(text: str) -> pb.Target:
    """``service.namespace[.svc[.cluster.local]][:port]``: the one target grammar (:meth:`Target.parse`)."""
    try:
        return pb.Target.parse(text)
    except pb.InvalidTarget as e:
        raise argparse.ArgumentTypeError(f"{e} (e.g. greet.default or greet.default:grpc)") from None


def _port(args: argparse.Namespace, target: pb.Target) -> str:
    """The port asked for: the target's ``:port`` or ``--port`` (not two different ones)."""
    flag = args.port
    if flag:
        try:
            flag = pb.canonical_port(flag)
        except pb.InvalidTarget as e:
            raise CliError(EXIT_USAGE, f"--port: {e}") from None
    if flag and target.port and flag != target.port:
        raise CliError(EXIT_USAGE, f"two ports: {target} and --port {args.port}; give one")
    return str(flag or target.port)


def _version() -> str:
    try:
        return metadata.version("lookaside-grpc")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


# --- connection ----------------------------------------------------------------------------------------


def _read_pem(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CliError(EXIT_USAGE, f"{flag} {path}: {e.strerror or e}") from None


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """Channel credentials for the lookaside server; None means plaintext.

    Any of ``--tls-ca``/``--tls-cert``/``--tls-key``/``--tls-server-name`` turns TLS on
    (``grpc.ssl_channel_credentials``; without ``--tls-ca`` the system roots); ``--tls-cert`` with
    ``--tls-key`` presents a client certificate (mutual TLS).
    """
    ca, cert, key = (getattr(args, n, None) for n in ("tls_ca", "tls_cert", "tls_key"))
    if not (ca or cert or key or getattr(args, "tls_server_name", None)):
        return None
    if bool(cert) != bool(key):
        raise CliError(EXIT_USAGE, "a client certificate needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        _read_pem(ca, "--tls-ca"), _read_pem(key, "--tls-key"), _read_pem(cert, "--tls-cert")
    )


def connect(args: argparse.Namespace) -> grpc.Channel:
    """A channel to ``--server``."""
    creds = _credentials(args)
    if creds is not None:
        name = getattr(args, "tls_server_name", None)
        options = [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)] if name else []
        return grpc.secure_channel(args.server, creds, options=options)
    return grpc.insecure_channel(args.server)


def _reachable(channel: grpc.Channel, timeout: float = 1.0) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        return False
    return True


def _bad_field(err: grpc.RpcError) -> str | None:
    """The field named by a google.rpc.BadRequest detail, if the error carries one. Decoding it takes
    googleapis-common-protos (it comes with the server extra, not the client); without it: no hint."""
    try:
        status_pb2: Any = importlib.import_module("google.rpc.status_pb2")
        details_pb2: Any = importlib.import_module("google.rpc.error_details_pb2")
    except ImportError:
        return None
    trailers: Sequence[tuple[str, str | bytes]] = (
        err.trailing_metadata() or () if isinstance(err, grpc.Call) else ()
    )
    for key, value in trailers:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            bad = details_pb2.BadRequest()
            if detail.Unpack(bad) and bad.field_violations:
                return str(bad.field_violations[0].field)
    return None


def rpc_failure(
    err: grpc.RpcError, args: argparse.Namespace, channel: grpc.Channel, target: pb.Target | None
) -> CliError:
    """Turn a failed RPC into an exit code and a message saying what to do."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else str(err)) or code.name
    server = args.server
    if code == grpc.StatusCode.NOT_FOUND:
        hint = "check the Service name and namespace" + (
            f" (kubectl get service {target.service} -n {target.namespace})" if target else ""
        )
        return CliError(EXIT_NOT_FOUND, f"not found: {details}; {hint}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = _bad_field(err)
        hint = f"fix the {field}" if field else "fix the request"
        if field in ("service", "namespace"):
            hint += " (Kubernetes names: lowercase letters, digits and '-'; write <service>.<namespace>)"
        elif field == "port":
            hint += (
                " (--port takes the Service port's name or number (spec.ports[].port), not the pods' "
                "targetPort)"
            )
        return CliError(EXIT_INVALID_ARGUMENT, f"invalid argument: {details}; {hint}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        ns = f" {target.namespace!r}" if target else ""
        return CliError(
            EXIT_PERMISSION_DENIED,
            f"permission denied: {details}; the lookaside server is not allowed to serve namespace{ns}"
            " - add it with the server's --allow-namespace flag (and grant its ServiceAccount "
            "read access to EndpointSlices there)",
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        if _reachable(channel):
            return CliError(
                EXIT_UNAVAILABLE,
                f"unavailable: {details} (the server at {server} answered; "
                "the target has no ready endpoint right now)",
            )
        return CliError(
            EXIT_UNAVAILABLE,
            f"cannot reach the lookaside server at {server}: {details}; check "
            "--server (or LOOKASIDE_ADDR) and that the server is running",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(
            EXIT_DEADLINE,
            f"no answer from {server} within the deadline: {details}; check --server or raise --rpc-timeout",
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return CliError(
            EXIT_UNIMPLEMENTED,
            f"the server at {server} does not support this command ({details}); upgrade the lookaside server",
        )
    return CliError(EXIT_ERROR, f"{code.name}: {details}")


# --- output --------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class _EndpointLike(Protocol):
    ip: str
    port: int
    port_name: str
    zone: str

    @property
    def for_zones(self) -> Iterable[str]: ...


def _endpoint_dict(e: _EndpointLike) -> dict[str, object]:
    return {
        "ip": e.ip,
        "port": e.port,
        "port_name": e.port_name,
        "zone": e.zone,
        "for_zones": list(e.for_zones),
    }


def _emit_json(data: object, out: TextIO) -> None:
    out.write(json.dumps(data) + "\n")
    out.flush()


# --- commands ------------------------------------------------------------------------------------------


def cmd_resolve(args: argparse.Namespace, channel: grpc.Channel, out: TextIO) -> int:
    target: pb.Target = args.target
    port = _port(args, target)
    target = target.with_port(port)
    req = pb.Request(
        router=_ROUTERS[args.router],
        service=target.service,
        namespace=target.namespace,
        port=port,
        count=args.count,
    )
    try:
        resp = pb.LookasideStub(channel).Resolve(req, timeout=args.rpc_timeout)
    except grpc.RpcError as err:
        raise rpc_failure(err, args, channel, target) from None
    if args.json:
        _emit_json(
            {
                "target": str(target),
                "router": args.router,
                "version": resp.version,
                "address": resp.address,
                "port": resp.port,
                "endpoints": [_endpoint_dict(e) for e in resp.endpoints],
            },
            out,
        )
        return EXIT_OK
    out.write(f"{target} (version {resp.version}, {args.router}, {len(resp.endpoints)} pick(s)):\n")
    out.write(
        table(
            ["#", "ADDRESS", "PORT NAME", "ZONE"],
            [
                (i, _addr(e.ip, e.port), e.port_name or "-", e.zone or "-")
                for i, e in enumerate(resp.endpoints, 1)
            ],
            indent="  ",
        )
        + "\n"
    )
    return EXIT_OK


def cmd_watch(args: argparse.Namespace, channel: grpc.Channel, out: TextIO) -> int:
    target: pb.Target = args.target
    port = _port(args, target)
    target = target.with_port(port)
    req = pb.WatchRequest(service=target.service, namespace=target.namespace, port=port)
    stream = pb.LookasideStub(channel).Watch(req, timeout=args.timeout)
    seen = 0
    previous: dict[tuple[str, int], pb.Endpoint] | None = None
    try:
        for update in stream:
            seen += 1
            current = {(e.ip, e.port): e for e in update.endpoints}
            added = [k for k in current if previous is not None and k not in previous]
            removed = [k for k in (previous or {}) if k not in current]
            now = time.time()
            if args.json:
                _emit_json(
                    {
                        "target": str(target),
                        "version": update.version,
                        "received_at": now,
                        "initial": previous is None,
                        "endpoints": [_endpoint_dict(e) for e in update.endpoints],
                        "added": [_addr(*k) for k in added],
                        "removed": [_addr(*k) for k in removed],
                    },
                    out,
                )
            else:
                what = "initial set" if previous is None else f"+{len(added)} -{len(removed)}"
                out.write(
                    f"{_iso(now)}  {target} version {update.version}: "
                    f"{len(update.endpoints)} endpoint(s) ({what})\n"
                )
                rows = [
                    ("+" if k in added else "", _addr(*k), e.port_name or "-", e.zone or "-")
                    for k, e in current.items()
                ]
                gone = previous or {}
                rows += [("-", _addr(*k), gone[k].port_name or "-", gone[k].zone or "-") for k in removed]
                if rows:
                    out.write(table(["", "ADDRESS", "PORT NAME", "ZONE"], rows, indent="  ") + "\n")
                out.flush()
            previous = current
            if args.max_updates and seen >= args.max_updates:
                stream.cancel()
                return EXIT_OK
    except grpc.RpcError as err:
        code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and seen and not args.max_updates:
            return EXIT_OK  # --timeout is the normal end of a time-boxed watch
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            wanted = f"{args.max_updates} update(s)" if args.max_updates else "the first update"
            raise CliError(
                EXIT_DEADLINE, f"timed out after {args.timeout} s with {seen} update(s), waiting for {wanted}"
            ) from None
        if code == grpc.StatusCode.CANCELLED:
            return EXIT_OK
        raise rpc_failure(err, args, channel, target) from None
    except KeyboardInterrupt:
        stream.cancel()
        if not args.json:
            out.write("stopped\n")
        return EXIT_OK
    # The stream ended without an error: the server shut down.
    raise CliError(
        EXIT_UNAVAILABLE,
        f"the server at {args.server} ended the watch (shutting down?) after {seen} update(s)",
    )


def cmd_status(args: argparse.Namespace, channel: grpc.Channel, out: TextIO) -> int:
    target: pb.Target | None = args.target
    if target is not None and target.port:
        raise CliError(EXIT_USAGE, f"status shows a whole Service: write {target.with_port('')}, no :port")
    req = (
        pb.StatusRequest(service=target.service, namespace=target.namespace) if target else pb.StatusRequest()
    )
    try:
        resp = pb.LookasideStub(channel).Status(req, timeout=args.rpc_timeout)
    except grpc.RpcError as err:
        raise rpc_failure(err, args, channel, target) from None
    view = pb.status_to_dict(resp)
    if args.json:
        _emit_json(view, out)
        return EXIT_OK
    now = resp.generated_at
    targets: list[dict[str, Any]] = view["targets"]
    out.write(
        f"lookaside server {args.server}: version {resp.server_version}, source {resp.source}, "
        f"{len(targets)} tracked target(s)\n"
    )
    if not targets:
        out.write("no targets tracked yet: a target appears once a client resolves or watches it\n")
        return EXIT_OK
    out.write(
        "\n"
        + table(
            ["TARGET", "VERSION", "ENDPOINTS", "READY", "WATCHERS", "LAST CHANGE"],
            [
                (
                    t["target"] + ("" if t["exists"] else " (gone)"),
                    t["version"],
                    t["endpoints_total"],
                    t["endpoints_ready"],
                    t["watchers"],
                    f"{t['changed_at_iso']} ({pb.ago(now - t['changed_at'])})",
                )
                for t in targets
            ],
        )
        + "\n"
    )
    if args.summary:
        return EXIT_OK
    for t in targets:
        out.write(f"\n{t['target']}:\n")
        if t["endpoints"]:
            out.write(
                table(
                    ["ADDRESS", "PORT NAME", "ZONE", "READY", "SERVING", "TERMINATING"],
                    [
                        (
                            _addr(e["ip"], e["port"]),
                            e["port_name"] or "-",
                            e["zone"] or "-",
                            _yn(e["ready"]),
                            _yn(e["serving"]),
                            _yn(e["terminating"]),
                        )
                        for e in t["endpoints"]
                    ],
                    indent="  ",
                )
                + "\n"
            )
        else:
            out.write("  no endpoints\n")
        if t["source"]:
            out.write("  source: " + ", ".join(f"{k}={v}" for k, v in t["source"].items()) + "\n")
    return EXIT_OK


def _yn(value: bool) -> str:
    return "yes" if value else "no"


# --- parser and main -----------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)  # argparse turns the ValueError into a usage error
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {value}")
    return value


def _common_flags(with_defaults: bool) -> argparse.ArgumentParser:
    """Flags accepted before and after the command; after it they must not reset values given before it."""
    server = os.environ.get("LOOKASIDE_ADDR") or DEFAULT_SERVER

    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=default(server),
        help=f"host:port of the lookaside server (LOOKASIDE_ADDR; default {server})",
    )
    common.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable JSON output"
    )
    tls = [
        ("--tls-ca", "LOOKASIDE_TLS_CA", "CA bundle to verify the server (default: system roots)"),
        ("--tls-cert", "LOOKASIDE_TLS_CERT", "client certificate for mutual TLS (with --tls-key)"),
        ("--tls-key", "LOOKASIDE_TLS_KEY", "private key of --tls-cert"),
        (
            "--tls-server-name",
            "LOOKASIDE_TLS_SERVER_NAME",
            "name the server certificate must carry, if not the --server host",
        ),
    ]
    for flag, env, text in tls:
        common.add_argument(
            flag,
            default=default(os.environ.get(env) or None),
            help=f"{text}; any --tls-* flag turns TLS on ({env})",
        )
    common.add_argument(
        "--rpc-timeout",
        type=_positive_float,
        default=default(5.0),
        help="seconds to wait for an answer (default 5)",
    )
    return common


_TARGET_HELP = "service.namespace[.svc[.cluster.local]][:port], e.g. greet.default or greet.default:grpc"
_PORT_HELP = (
    "the Service port's name or number (spec.ports[].port, as inside the cluster; a targetPort number is "
    "refused), as target:port (default: the only/first port)"
)


def build_parser() -> argparse.ArgumentParser:
    """The ``lookaside`` argument parser."""
    common = _common_flags(with_defaults=True)
    sub_common = _common_flags(with_defaults=False)
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="lookaside", description=__doc__, epilog=EXIT_CODES_HELP, formatter_class=fmt, parents=[common]
    )
    p.add_argument("--version", action="version", version=f"lookaside {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{resolve,watch,status}")

    r = sub.add_parser(
        "resolve",
        parents=[sub_common],
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
        help="ask which backend(s) to call now",
        description="Ask the server for the next pick(s).",
    )
    r.add_argument("target", type=parse_target, help=_TARGET_HELP)
    r.add_argument(
        "--router",
        choices=sorted(_ROUTERS),
        default="round_robin",
        help="round_robin (the server's shared rotation) or random (default %(default)s)",
    )
    r.add_argument("--port", default="", help=_PORT_HELP)
    r.add_argument("--count", type=_positive_int, default=1, help="picks to return (default %(default)s)")
    r.set_defaults(func=cmd_resolve)

    w = sub.add_parser(
        "watch",
        parents=[sub_common],
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
        help="print every change of a target's endpoint set until Ctrl-C",
        description="Stream a target's eligible endpoint set: now, then on every change.",
    )
    w.add_argument("target", type=parse_target, help=_TARGET_HELP)
    w.add_argument("--port", default="", help=_PORT_HELP)
    w.add_argument("--max-updates", type=_positive_int, default=0, help="stop after this many updates")
    w.add_argument("--timeout", type=_positive_float, default=None, help="stop after this many seconds")
    w.set_defaults(func=cmd_watch)

    s = sub.add_parser(
        "status",
        parents=[sub_common],
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
        help="targets the server tracks, endpoints, watchers and source health",
        description="Show what the server tracks (targets appear once a client asks for them).",
    )
    s.add_argument(
        "target",
        type=parse_target,
        nargs="?",
        default=None,
        help="only this service.namespace (default: every tracked target)",
    )
    s.add_argument("--summary", action="store_true", help="one line per target, no endpoint tables")
    s.set_defaults(func=cmd_status)
    return p


def _fail(err: CliError, stderr: TextIO) -> NoReturn:
    stderr.write(f"lookaside: {err}\n")
    sys.exit(err.code)


def run(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Parse ``argv`` and run the command; return the exit code (argparse exits 2 itself on usage errors)."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    func: Callable[[argparse.Namespace, grpc.Channel, TextIO], int] = args.func
    with connect(args) as channel:
        return func(args, channel, out)


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``lookaside`` (also ``python -m lookaside_grpc``)."""
    try:
        code = run(argv)
    except CliError as e:
        _fail(e, sys.stderr)
    except KeyboardInterrupt:
        code = EXIT_OK
    except BrokenPipeError:  # e.g. `lookaside watch ... | head`
        code = EXIT_OK
    sys.exit(code)


if __name__ == "__main__":
    main()
