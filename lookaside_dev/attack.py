"""Helpers for the attack tests (fuzz, load, faults): the lookaside server as a subprocess with its memory
read from /proc, churning endpoint sets whose generation can be recognised from any answer, raw HTTP/2
frames, and the gRPC status sets the attack tests accept."""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

# --- status sets ----------------------------------------------------------------------------------------

#: What a typed Resolve/Watch/Status may answer (never UNKNOWN or INTERNAL: those mean a server exception).
TYPED_OK = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


# --- churning endpoint sets -----------------------------------------------------------------------------


def generation_set(gen: int, size: int, port: int = 50051) -> list[dict[str, Any]]:
    """``size`` endpoints whose addresses encode ``gen``: ``10.<gen/256>.<gen%256>.<k>``."""
    return [
        {"ip": f"10.{(gen >> 8) & 0xFF}.{gen & 0xFF}.{k + 1}", "port": port, "port_name": "grpc"}
        for k in range(size)
    ]


def generation_of(ip: str) -> int:
    """The generation an address of :func:`generation_set` belongs to."""
    parts = ip.split(".")
    return (int(parts[1]) << 8) | int(parts[2])


# --- the lookaside server as a subprocess ---------------------------------------------------------------

_LISTENING = re.compile(r"listening on \S*:(\d+)")
#: The start of a record of the server's text log format ("2026-12-02 06:45:04,055 LEVEL ...").
_LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


class ServerProcess:
    """``python -m lookaside_server`` on 127.0.0.1 over a static file; stderr goes to a log file (a pipe
    would fill up and block the server), the bound port is read from its "listening on" line."""

    def __init__(
        self,
        static_file: Path,
        log_path: Path,
        port: int = 0,
        poll_interval: float = 0.02,
        extra: Sequence[str] = (),
    ) -> None:
        self.static_file = static_file
        self.log_path = log_path
        self.poll_interval = poll_interval
        self.extra = list(extra)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> ServerProcess:
        """Start the server (on the last bound port if it ran before) and wait until it listens."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        start_at = self.log_path.stat().st_size
        cmd = [
            sys.executable,
            "-m",
            "lookaside_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--http-port",
            "-1",
            "--static-file",
            str(self.static_file),
            "--poll-interval",
            str(self.poll_interval),
            "--grace",
            "0.5",
            "--no-xds",
            *self.extra,
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                f.seek(start_at)
                m = _LISTENING.search(f.read().decode(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"lookaside server exited {self.proc.returncode}: {self.tail()}")
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"lookaside server did not listen within {timeout} s: {self.tail()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the server process, in kB, from /proc/PID/status."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients (their streams and connections just break)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def errors_logged(self) -> list[str]:
        """Every ERROR record and every traceback in the server log, each with the lines that follow it up
        to the next log record (so that a failing assertion shows the exception, not just its first line).

        Left out, and only after the server logged "shutting down": grpc.aio's own report of an RPC task it
        cancelled itself at shutdown (``Exception not handled by _handle_exceptions`` with a bare
        CancelledError and no frame of ours), which grpc logs and prints for a handler that had not run yet
        when its call was cancelled; see ``_app._drain_handlers`` for the part of it the server prevents."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        found: list[list[str]] = []
        during_shutdown: list[bool] = []  # per block: logged after "shutting down"
        block: list[str] | None = None  # the ERROR record or traceback being collected
        stopping = False
        for line in text.splitlines():
            if _LOG_RECORD.match(line):
                stopping = stopping or "shutting down" in line
                block = [line] if " ERROR " in line else None
            elif block is None and line.startswith("Traceback"):
                block = [line]
            elif block is not None:
                block.append(line)
                continue
            else:
                continue
            if block is not None:
                found.append(block)
                during_shutdown.append(stopping)
        return [
            "\n".join(b)
            for b, late in zip(found, during_shutdown, strict=True)
            if not (late and _grpc_shutdown_cancellation(b))
        ]

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _grpc_shutdown_cancellation(block: list[str]) -> bool:
    """Whether a logged block is grpc.aio reporting (or printing) a CancelledError of one of its own RPC
    tasks, with no frame of this project in the traceback."""
    first = block[0]
    if " ERROR " in first and "Exception not handled by _handle_exceptions" not in first:
        return False
    tracebacks = [line for line in block if line.startswith("Traceback")]
    ends = [line.strip() for line in block[1:] if line and not line.startswith((" ", "Traceback"))]
    return (
        bool(tracebacks)
        and all(e in ("asyncio.exceptions.CancelledError", "CancelledError") for e in ends)
        and not any("lookaside" in line for line in block[1:])
    )


# --- raw HTTP/2 -----------------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """One HTTP/2 frame; ``length`` may lie about the payload size."""
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([ftype, flags]) + struct.pack(">I", stream & 0x7FFFFFFF) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(headers: Iterable[tuple[str, str]]) -> bytes:
    """A header block of literal-without-indexing fields with new names and no Huffman coding."""
    out = b""
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return out


def grpc_request_headers(path: str = "/lookaside.Lookaside/Resolve") -> bytes:
    return hpack_literal(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "lookaside"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )


def grpc_message(body: bytes, declared: int | None = None) -> bytes:
    """A gRPC length-prefixed message (uncompressed); ``declared`` may lie about its length."""
    return b"\x00" + struct.pack(">I", len(body) if declared is None else declared) + body


def send_raw(
    address: tuple[str, int], chunks: Sequence[bytes], read_for: float = 0.3, linger: bool = False
) -> bytes:
    """Connect, send each chunk, read whatever comes back for ``read_for`` s, then close (RST if
    ``linger``). Returns the bytes received; connection errors just end the exchange."""
    got = b""
    with socket.create_connection(address, timeout=2.0) as s:
        if linger:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except OSError:
            return got
        deadline = time.monotonic() + read_for
        s.settimeout(0.05)
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            got += data
    return got


def frames_of(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split received bytes into (type, flags, stream, payload) frames (drops a trailing partial frame)."""
    out = []
    i = 0
    while i + 9 <= len(data):
        n = int.from_bytes(data[i : i + 3], "big")
        ftype, flags = data[i + 3], data[i + 4]
        stream = int.from_bytes(data[i + 5 : i + 9], "big") & 0x7FFFFFFF
        if i + 9 + n > len(data):
            break
        out.append((ftype, flags, stream, data[i + 9 : i + 9 + n]))
        i += 9 + n
    return out


def wait_for(predicate: Any, timeout: float, what: str = "", interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)
