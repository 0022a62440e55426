"""Durable file writes: temp name in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import ctypes
import errno
import os

from ..errors import StoreError, StoreFull
from ..paths import fsync_dir, replace_file  # noqa: F401  (fsync_dir: store modules call it here)

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str) -> None:
    """Flush every file of path's filesystem at once: cheaper than one fsync a chunk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            raise_os_error(OSError(ctypes.get_errno(), "syncfs failed"), path)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, *, mode: int = 0o600, fsync: bool = True) -> None:
    try:
        replace_file(path, data, mode=mode, fsync=fsync)
    except OSError as exc:
        raise_os_error(exc, path)


def raise_os_error(exc: OSError, path: str):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StoreFull(f"no space left while writing {path}") from None
    raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
