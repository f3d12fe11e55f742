"""HTTP/2 rapid reset (CVE-2023-44487) on the gRPC port of a lookaside server process: one connection opens
20,000 streams and resets each right away (HEADERS, then RST_STREAM CANCEL), in three bursts.

grpc counts a stream against ``grpc.max_concurrent_streams`` (``--max-streams-per-connection``, 256) until
the server has released it, reset ones included, and refuses new streams beyond it (REFUSED_STREAM); calls
grpc core queues for the Python server are bounded by ``--max-pending-requests`` (grpc's own 1000). So a
burst adds little memory, and repeated bursts add nothing more. Without the stream limit each burst added
about 135 MB (three bursts: +135, +135, +248 MB).

The server runs as a subprocess (``python -m lookaside_server``); RSS is read from /proc. Each burst ends
with a PING: its ACK means the server has read every frame before it (no sleeping to synchronise).
Figures go to FIGURES and are printed (pytest -s).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import grpc

from lookaside_dev.attack import (
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    ServerProcess,
    frame,
    grpc_request_headers,
)
from lookaside_dev.static_files import write_static
from lookaside_grpc import protocol as pb

STREAMS = 20_000
BURSTS = 3
RSS_BUDGET_MB = 50
CANCEL = b"\x00\x00\x00\x08"
REFUSED_STREAM = b"\x00\x00\x00\x07"
FIGURES: dict[str, object] = {}


class RawConnection:
    """One HTTP/2 connection driven by hand: a reader thread counts what the server sends and queues the
    ACKs it owes (SETTINGS, PING); only the sending thread writes to the socket."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self.acks: list[bytes] = []
        self.rst = 0
        self.refused = 0
        self.goaway = False
        self.pongs: set[bytes] = set()
        self.closed = threading.Event()
        self._pong = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="rapid-reset-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            buf += data
            while len(buf) >= 9:
                n = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + n:
                    break
                ftype, flags, payload = buf[3], buf[4], buf[9 : 9 + n]
                buf = buf[9 + n :]
                if ftype == SETTINGS and not flags & 1:
                    self.acks.append(frame(SETTINGS, 1, 0))
                elif ftype == PING:
                    if flags & 1:
                        with self._pong:
                            self.pongs.add(payload)
                            self._pong.notify_all()
                    else:
                        self.acks.append(frame(PING, 1, 0, payload))
                elif ftype == RST_STREAM:
                    self.rst += 1
                    self.refused += payload == REFUSED_STREAM
                elif ftype == GOAWAY:
                    self.goaway = True
        self.closed.set()
        with self._pong:
            self._pong.notify_all()

    def _owed(self) -> list[bytes]:
        out = []
        while self.acks:
            out.append(self.acks.pop(0))
        return out

    def rapid_reset(self, first_stream: int, count: int, batch: int = 500) -> int:
        """Open and reset ``count`` streams; return the next stream id."""
        headers = grpc_request_headers()
        sid = first_stream
        chunk: list[bytes] = []
        for _ in range(count):
            chunk.append(frame(HEADERS, END_HEADERS, sid, headers))
            chunk.append(frame(RST_STREAM, 0, sid, CANCEL))
            sid += 2
            if len(chunk) >= 2 * batch:
                self.sock.sendall(b"".join(self._owed() + chunk))
                chunk = []
        self.sock.sendall(b"".join(self._owed() + chunk))
        return sid

    def ping(self, payload: bytes, timeout: float = 30.0) -> None:
        """PING and wait for its ACK: every frame sent before it has been read by the server."""
        self.sock.sendall(b"".join([*self._owed(), frame(PING, 0, 0, payload)]))
        deadline = time.monotonic() + timeout
        with self._pong:
            while payload not in self.pongs:
                assert not self.closed.is_set(), "the server closed the connection"
                left = deadline - time.monotonic()
                assert left > 0, "no PING ACK"
                self._pong.wait(min(left, 0.5))
                if self.acks:  # acks owed while waiting (e.g. the server's own pings)
                    self.sock.sendall(b"".join(self._owed()))

    def close(self) -> None:
        self.sock.close()
        self._reader.join(5)


def rss_mb(server: ServerProcess) -> float:
    return server.memory_kb()["VmRSS"] / 1024


def test_rapid_reset_bursts_keep_rss_bounded(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.json"
    write_static(path, {"default/greet": [{"ip": "10.0.0.1", "port": 50051, "port_name": "grpc"}]})
    with ServerProcess(path, tmp_path / "server.log") as server, grpc.insecure_channel(server.address) as ch:
        stub = pb.LookasideStub(ch)

        def resolve_ms() -> float:
            start = time.monotonic()
            assert stub.Resolve(pb.Request(service="greet", namespace="default"), timeout=10).port == 50051
            return (time.monotonic() - start) * 1000

        resolve_ms()
        base = rss_mb(server)
        after: list[float] = []
        resolves: list[float] = []
        conn = RawConnection(("127.0.0.1", server.port))
        try:
            sid = 1
            for burst in range(BURSTS):
                started = time.monotonic()
                sid = conn.rapid_reset(sid, STREAMS)
                conn.ping(burst.to_bytes(8, "big"))  # PING payloads are 8 bytes
                sent_s = time.monotonic() - started
                resolves.append(resolve_ms())  # served after everything grpc queued for the Python server
                after.append(rss_mb(server))
                print(f"burst {burst + 1}: {STREAMS} resets in {sent_s:.2f} s, RSS {after[-1]:.0f} MB")
            refused, rst, goaway = conn.refused, conn.rst, conn.goaway
        finally:
            conn.close()
        peak = server.memory_kb()["VmHWM"] / 1024
        alive = server.alive()
        errors = server.errors_logged()
    FIGURES["rapid reset"] = {
        "streams per burst": STREAMS,
        "bursts": BURSTS,
        "rss base MB": round(base, 1),
        "rss after each burst MB": [round(x, 1) for x in after],
        "added MB": [round(x - base, 1) for x in after],
        "peak rss MB": round(peak, 1),
        "refused (REFUSED_STREAM)": refused,
        "rst from server": rst,
        "goaway": goaway,
        "resolve ms after each burst": [round(x, 1) for x in resolves],
    }
    print("\nrapid reset:", FIGURES["rapid reset"])
    assert alive
    assert all(x - base < RSS_BUDGET_MB for x in after), (base, after)
    assert peak - base < RSS_BUDGET_MB, (base, peak)
    assert after[-1] - after[0] < RSS_BUDGET_MB / 2, after  # repeated bursts add (almost) nothing
    assert refused > 0  # the stream limit did the work
    assert errors == [], errors[:5]
