"""The dev-only helpers that judge test outcomes: a helper that hides a real error would hide a bug."""

from __future__ import annotations

from pathlib import Path

from lookaside_dev.attack import ServerProcess

SHUTDOWN = "2026-12-02 06:45:04,000 INFO lookaside_server: shutting down\n"
GRPC_CANCEL = (
    "2026-12-02 06:45:04,055 ERROR grpc._cython.cygrpc: Exception not handled by _handle_exceptions in "
    "servicer method [/lookaside.Lookaside/Watch]\n"
    "Traceback (most recent call last):\n"
    '  File "src/python/grpcio/grpc/_cython/_cygrpc/aio/server.pyx.pxi", line 1, in _schedule_rpc_coro\n'
    "asyncio.exceptions.CancelledError\n"
    "Traceback (most recent call last):\n"
    '  File "src/python/grpcio/grpc/_cython/_cygrpc/aio/server.pyx.pxi", line 1, in _schedule_rpc_coro\n'
    "asyncio.exceptions.CancelledError\n"
)
OURS = (
    "2026-12-02 06:45:04,056 ERROR grpc._cython.cygrpc: Exception not handled by _handle_exceptions in "
    "servicer method [/lookaside.Lookaside/Watch]\n"
    "Traceback (most recent call last):\n"
    '  File "/srv/lookaside_server/_api/servicer.py", line 1, in Watch\n'
    "asyncio.exceptions.CancelledError\n"
)
OTHER = (
    "2026-12-02 06:45:04,058 ERROR lookaside_server._web.http: boom\n"
    "Traceback (most recent call last):\n"
    "KeyError: 'x'\n"
)
STOPPED = "2026-12-02 06:45:04,059 INFO lookaside_server._app: stopped\n"


def errors(tmp_path: Path, text: str) -> list[str]:
    log = tmp_path / "server.log"
    log.write_text(text)
    server = ServerProcess(tmp_path / "unused.json", log)
    return server.errors_logged()


def test_errors_come_with_their_traceback(tmp_path: Path) -> None:
    found = errors(tmp_path, OTHER + STOPPED)
    assert found == [OTHER.rstrip("\n")]


def test_grpc_cancelling_its_own_task_at_shutdown_is_left_out_but_only_then(tmp_path: Path) -> None:
    assert errors(tmp_path, SHUTDOWN + GRPC_CANCEL + STOPPED) == []
    before_shutdown = errors(tmp_path, GRPC_CANCEL + SHUTDOWN + STOPPED)
    assert len(before_shutdown) == 1 and before_shutdown[0].endswith("CancelledError")


def test_a_cancellation_in_our_code_or_another_error_is_kept(tmp_path: Path) -> None:
    found = errors(tmp_path, SHUTDOWN + GRPC_CANCEL + OURS + OTHER + STOPPED)
    assert [f.splitlines()[-1] for f in found] == ["asyncio.exceptions.CancelledError", "KeyError: 'x'"]
    assert "servicer.py" in found[0]
