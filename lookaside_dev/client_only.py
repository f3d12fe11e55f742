"""What a client-only install (``pip install lookaside-grpc``, no server extra) lacks, for tests that run
client code as if the server extra were missing."""

from __future__ import annotations

#: The server extra's third-party modules (pyproject's `server` extra).
SERVER_EXTRA_MODULES = (
    "aiohttp",
    "cryptography",
    "envoy",
    "google.rpc",
    "grpc_health",
    "grpc_reflection",
    "grpc_status",
    "kubernetes",
    "prometheus_client",
    "yaml",
)


def hide_modules_code(*also: str) -> str:
    """Python source that makes ``import`` of each server-extra module (and ``also``) fail:
    ``sys.modules[name] = None`` is how the import system spells "not importable"."""
    return "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in (*SERVER_EXTRA_MODULES, *also))
