"""Running a LookasideServer on its own event loop in a daemon thread (for tests, demos and benchmarks)."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

from lookaside_server._app import LookasideServer, ServerConfig

log = logging.getLogger(__name__)


@dataclass
class RunningServer:
    """A server running in a background thread; ``stop()`` shuts it down and joins the thread."""

    port: int
    server: LookasideServer
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _stop: asyncio.Event = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: where local clients reach it."""
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (idempotent) and join its thread."""
        if self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # loop already closed
                pass
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("lookaside server thread did not stop within %.1f s", timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_in_thread(config: ServerConfig, timeout: float = 10.0) -> RunningServer:
    """Start a server for ``config`` in a daemon thread and return once it is bound (raise if it fails)."""
    ready = threading.Event()
    result: dict[str, object] = {}

    async def main() -> None:
        stop = asyncio.Event()
        try:
            server = LookasideServer(config)
            port = await server.start()
        except BaseException as e:
            result["error"] = e
            ready.set()
            return
        result.update(port=port, server=server, loop=asyncio.get_running_loop(), stop=stop)
        ready.set()
        try:
            await stop.wait()
        finally:
            await server.stop()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="lookaside-server", daemon=True)
    thread.start()
    if not ready.wait(timeout):
        raise TimeoutError(f"lookaside server not bound within {timeout} s")
    if "error" in result:
        thread.join(timeout)
        raise result["error"]  # type: ignore[misc]
    return RunningServer(
        port=result["port"],
        server=result["server"],
        _loop=result["loop"],  # type: ignore[arg-type]
        _stop=result["stop"],
        _thread=thread,
    )  # type: ignore[arg-type]
