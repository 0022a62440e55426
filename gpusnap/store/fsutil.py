"""Durable file writes: temp name in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import ctypes
import errno
import os
import threading

from ..errors import StoreError, StoreFull

_libc = ctypes.CDLL(None, use_errno=True)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str) -> None:
    """Flush every file of path's filesystem at once: cheaper than one fsync a chunk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            raise_os_error(OSError(ctypes.get_errno(), "syncfs failed"), path)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, *, mode: int = 0o600, fsync: bool = True) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{id(data):x}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        if fsync:
            fsync_dir(os.path.dirname(path))
    except BaseException as exc:        # an interrupt too: leave no temp file behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise_os_error(exc, path)
        raise


def write_renamed(path: str, tmp_dir: str, data) -> None:
    """Write data to a name in tmp_dir unique to this thread, then rename it to path: path
    is complete whenever it exists (not durable: no fsync). No temp file is left behind,
    also when SIGTERM ends the writer."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = os.path.join(tmp_dir, f"{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
                  "wb", closefd=True) as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def raise_os_error(exc: OSError, path: str):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StoreFull(f"no space left while writing {path}") from None
    raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
