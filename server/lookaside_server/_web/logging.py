"""Server logging: plain text or one JSON object per line (``--log-format json``), with the RPC's peer and
target attached when known.

The server interceptor binds the peer of each RPC and the access policy the target it names
(:func:`bind_peer`, :func:`bind_target`: context variables, so they follow the RPC's task); the
:class:`ContextFilter` copies them onto every record logged meanwhile. ``extra={"target": ..., "peer": ...}``
on a log call wins over the context. Nothing here logs credentials: the TLS module logs file names and
certificate fingerprints only, never file contents.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
from typing import Any, TextIO

_peer: contextvars.ContextVar[str | None] = contextvars.ContextVar("lookaside_peer", default=None)
_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("lookaside_target", default=None)

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Record attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def bind_peer(peer: str | None) -> None:
    """Attach ``peer`` (and no target yet) to the log records of the current RPC."""
    _peer.set(peer)
    _target.set(None)


def bind_target(target: str | None) -> None:
    """Attach ``target`` (``namespace/service``) to the log records of the current RPC."""
    _target.set(target)


class ContextFilter(logging.Filter):
    """Sets ``record.peer`` / ``record.target`` from the RPC context unless the call passed them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "peer", None) is None:
            record.peer = _peer.get()
        if getattr(record, "target", None) is None:
            record.target = _target.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then peer/target when known,
    other ``extra=`` fields, and ``exception`` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("target", "peer"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and value is not None:
                out[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def make_handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler with the context filter and the chosen format (``text`` or ``json``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (use {' or '.join(FORMATS)})")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure(level: int, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Set up the root logger (replacing its handlers) for ``level`` and ``fmt``."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(fmt, stream))
    root.setLevel(level)
