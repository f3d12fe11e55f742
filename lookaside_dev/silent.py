"""Silent peers for client tests: a TCP listener that accepts connections and never answers, and a TCP proxy
that can be frozen (bytes stop flowing both ways, connections stay open), as a SIGSTOPped process or a
network partition looks to a client."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Sequence
from concurrent import futures

import grpc

from lookaside_dev.fakes import FakeLookaside
from lookaside_grpc import protocol


class SilentListener:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte (context manager)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silent-listener", daemon=True)
        self._thread.start()

    @property
    def accepted(self) -> int:
        return len(self._accepted)

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.05)
            if ready:
                conn, _ = self._sock.accept()
                self._accepted.append(conn)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._accepted:
            conn.close()
        self._sock.close()

    def __enter__(self) -> SilentListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FreezableProxy:
    """Forwards TCP from a 127.0.0.1 port to ``upstream``; ``freeze()`` stops all traffic (open connections
    stay open, new ones are accepted and left silent), ``thaw()`` resumes it (context manager)."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._frozen = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, name="freezable-proxy", daemon=True)
        self._accept_thread.start()

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns) // 2

    def _accept(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.05)
            if not ready:
                continue
            client, _ = self._sock.accept()
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            with self._lock:
                self._conns += [client, upstream]
                self._threads.append(thread)
            thread.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        while not self._stop.is_set():
            if self._frozen.is_set():
                self._stop.wait(0.02)
                continue
            ready, _, _ = select.select([a, b], [], [], 0.05)
            for src in ready:
                if self._frozen.is_set():
                    break
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    a.close()
                    b.close()
                    return
                try:
                    peer[src].sendall(data)
                except OSError:
                    a.close()
                    b.close()
                    return

    def stop(self) -> None:
        self._stop.set()
        self._accept_thread.join(5)
        with self._lock:
            threads, conns = list(self._threads), list(self._conns)
        for thread in threads:
            thread.join(5)
        for conn in conns:
            conn.close()
        self._sock.close()

    def __enter__(self) -> FreezableProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Server options accepting client keepalive pings at any rate (as a lookaside with a short
#: ``--min-ping-interval``), so tests can use sub-second lookaside keepalives.
PING_FRIENDLY = (
    ("grpc.http2.min_ping_interval_without_data_ms", 10),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
)


class ServedLookaside:
    """A ``FakeLookaside`` (Watch and Resolve for any target name) on 127.0.0.1 (``port`` 0: any free one)
    with room for many open Watch streams (each holds a server thread)."""

    def __init__(self, endpoints: Sequence[str], max_workers: int = 128, port: int = 0) -> None:
        self.servicer = FakeLookaside(endpoints)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=PING_FRIENDLY)
        protocol.add_LookasideServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind 127.0.0.1:{port}")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.servicer.stop()
        self.server.stop(grace=None).wait(5)

    def __enter__(self) -> ServedLookaside:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_lookaside(endpoints: Sequence[str], max_workers: int = 128, port: int = 0) -> ServedLookaside:
    """Start a :class:`ServedLookaside` over ``endpoints`` (``host:port`` strings)."""
    return ServedLookaside(endpoints, max_workers, port)
