"""Linux inotify through ctypes, on the asyncio loop: directory watches reporting (directory, name, mask).

No dependency: ``inotify_init1``/``inotify_add_watch`` from libc and ``loop.add_reader`` on the inotify fd.
:func:`available` is False where the platform has no inotify (then callers poll).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = 0o2000000

#: What a directory watch asks for: every way a file in it can get new content or disappear.
DIR_EVENTS = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_EXCL_UNLINK
)
_HEADER = struct.Struct("iIII")

#: Called on the loop with (directory, name, mask); directory is None for a queue overflow.
Callback = Callable[[str | None, str, int], None]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def available() -> bool:
    """Whether this platform has inotify."""
    return _LIBC is not None


class DirectoryWatcher:
    """inotify watches on directories; ``callback`` runs on the loop for every event."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callback) -> None:
        if _LIBC is None:
            raise OSError(errno.ENOSYS, "inotify is not available on this platform")
        fd = _LIBC.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        self._loop = loop
        self._callback = callback
        self._dirs: dict[int, str] = {}
        loop.add_reader(fd, self._read)

    @property
    def directories(self) -> set[str]:
        """The directories watched now."""
        return set(self._dirs.values())

    def watch(self, directory: str) -> None:
        """Watch ``directory`` (idempotent); raise OSError if it cannot be watched."""
        if directory in self._dirs.values():
            return
        assert _LIBC is not None
        wd = _LIBC.inotify_add_watch(self._fd, os.fsencode(directory), DIR_EVENTS)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        self._dirs[wd] = directory

    def unwatch(self, directory: str) -> None:
        """Stop watching ``directory`` (no error if it is not watched)."""
        for wd, d in list(self._dirs.items()):
            if d == directory:
                del self._dirs[wd]
                assert _LIBC is not None
                _LIBC.inotify_rm_watch(self._fd, wd)

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            except OSError as e:  # pragma: no cover - the fd is ours; nothing sensible to do but stop
                log.warning("inotify read failed: %s", e)
                return
            if not data:
                return
            offset = 0
            while offset + _HEADER.size <= len(data):
                wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
                raw = data[offset + _HEADER.size : offset + _HEADER.size + length]
                offset += _HEADER.size + length
                name = os.fsdecode(raw.rstrip(b"\0"))
                if mask & IN_Q_OVERFLOW:
                    self._callback(None, "", mask)
                    continue
                directory = self._dirs.get(wd)
                if mask & IN_IGNORED:
                    self._dirs.pop(wd, None)
                if directory is not None:
                    self._callback(directory, name, mask)

    def close(self) -> None:
        """Remove every watch and close the inotify fd (idempotent)."""
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._dirs.clear()
