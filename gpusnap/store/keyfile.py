"""Key files for encrypted stores.

    KEYFILE ::= 64 lower-case hex digits, a newline      (what `gpusnap key generate` writes)
              | 32 raw bytes                             (also accepted)

A key file must be a regular file owned by the user running gpusnap, mode 0600 or 0400:
anything else is refused (InsecureStore), since whoever reads it reads every snapshot.
"""

from __future__ import annotations

import os
import secrets
import stat

from ..errors import InsecureStore, StoreError, UsageError, WrongKey
from . import fsutil
from .codec import KEY_SIZE, key_check

ALLOWED_MODES = (0o600, 0o400)


def generate(path: str) -> str:
    """Write a new random key to path (which must not exist), 0600; returns its fingerprint."""
    key = secrets.token_bytes(KEY_SIZE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists; a key file is never overwritten",
                         hint="name a new file; to replace a key, remove the old file yourself "
                              "(a store made with it no longer opens)") from None
    except OSError as exc:
        fsutil.raise_os_error(exc, path)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (key.hex() + "\n").encode())
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        fsutil.raise_os_error(exc, path)
    os.close(fd)
    fsutil.fsync_dir(os.path.dirname(os.path.abspath(path)))
    return fingerprint(key)


def load(path: str) -> bytes:
    """The key in path, after checking who may read the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InsecureStore(f"key file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise InsecureStore(f"key file {path} belongs to uid {st.st_uid}, not to you")
        if stat.S_IMODE(st.st_mode) not in ALLOWED_MODES:
            raise InsecureStore(f"key file {path} has mode {stat.S_IMODE(st.st_mode):o}; "
                                f"it must be 600 or 400", hint=f"chmod 600 {path}")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    return parse(data, path)


def parse(data: bytes, path: str = "key file") -> bytes:
    if len(data) == KEY_SIZE:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise WrongKey(f"{path} is not a gpusnap key ({2 * KEY_SIZE} hex digits or {KEY_SIZE} bytes)")


def fingerprint(key: bytes) -> str:
    """16 hex digits naming a key without revealing it (the start of its key check)."""
    return key_check(key)[:16]
