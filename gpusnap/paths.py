"""Safe filesystem steps every layer shares: a private directory, a file replaced atomically,
the question whether someone other than root can change a path.

Pure of click and of the store; errors.py is the only import, so the CRIU hook can use it
without loading the rest of gpusnap.
"""

from __future__ import annotations

import os
import secrets
import stat

from .errors import InsecureStore


def private_dir(path: str, what: str = "directory", hint: str | None = None) -> str:
    """path, created 0700 if missing, and refused unless it is a real directory of this uid
    that nobody else can enter (whoever can write into it decides what we read back)."""
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise InsecureStore(f"{what} {path} is not a private directory of uid {os.geteuid()}",
                            hint=hint or f"remove {path}; gpusnap recreates it")
    return path


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes, *, mode: int = 0o600, fsync: bool = True) -> None:
    """Write data to a new temp name beside path (O_EXCL, O_NOFOLLOW: never through a link
    someone left there), give it mode, then rename it over path: a reader sees the old
    file or the new one, and a link at path is replaced, not followed. Raises OSError."""
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode & 0o700)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        if fsync:
            fsync_dir(os.path.dirname(path) or ".")
    except BaseException:               # an interrupt too: leave no temp file behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def writable_by_others(paths) -> str | None:
    """The first path (or a directory above it) that a user other than root could change:
    not owned by root, or open to group or other writes (a sticky directory such as /tmp
    is fine above it). A path not there yet is judged by the directory it would go in."""
    for path in paths:
        cur = os.path.realpath(path)
        while not os.path.exists(cur) and cur != "/":
            cur = os.path.dirname(cur)
        while True:
            st = os.stat(cur)
            if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
                return cur
            if cur == "/":
                break
            cur = os.path.dirname(cur)
    return None
