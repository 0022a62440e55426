"""Store locks: shared for dumps, restores and verify; exclusive for rm and gc.

flock(2) on one file: the kernel drops it when the holder dies, so a crashed gpusnap
never leaves a stale lock behind. (The filelock package offers only exclusive locks.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator

from ..errors import StoreLocked


@contextlib.contextmanager
def store_lock(path: str, *, exclusive: bool, timeout: float = 30.0) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
