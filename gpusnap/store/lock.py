"""Store locks: shared for dumps, restores and verify; exclusive for rm and gc.

flock(2) on one file: the kernel drops it when the holder dies, so a crashed gpusnap
never leaves a stale lock behind. (The filelock package offers only exclusive locks.)

A store that may only be read (a read-only mount, a directory we cannot write) still
takes shared locks: flock needs no write access, so the lock file is opened read-only.
Where it does not exist and cannot be created, nobody can write that store either, so
there is nothing to lock against.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from typing import Iterator

from ..errors import StoreError, StoreLocked

_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _open(path: str, exclusive: bool) -> int | None:
    """The lock file's fd; None for a shared lock on a store nobody can write."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in _READ_ONLY:
            raise StoreError(f"cannot open the store lock {path}: {exc.strerror}") from None
        if exclusive:
            raise StoreError(f"the store at {os.path.dirname(path)} is read-only "
                             f"({exc.strerror}); this command changes it",
                             hint="ls, inspect, verify and export only read a store") from None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def store_lock(path: str, *, exclusive: bool, timeout: float = 30.0) -> Iterator[None]:
    fd = _open(path, exclusive)
    if fd is None:
        yield
        return
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    kind = "exclusive" if exclusive else "shared"
                    raise StoreLocked(f"could not take the {kind} store lock within {timeout:.0f}s",
                                      hint="another gpusnap rm/gc or dump is running") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
