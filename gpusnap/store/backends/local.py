"""A store in a local directory: the layout of docs/design.md, flock(2) for locks.

Chunks are written to tmp/ under a name unique to the writer and renamed into place
(durable at the next sync(): one syncfs instead of an fsync per chunk); other objects
are written atomically with fsync (fsutil.write_atomic).
"""

from __future__ import annotations

import os
import stat
from typing import Iterator

from ...errors import InsecureStore
from .. import fsutil
from ..lock import store_lock
from .base import Backend, Missing


class LocalBackend(Backend):
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.url = self.path
        self.tmp_dir = os.path.join(self.path, "tmp")

    def _path(self, name: str) -> str:
        return os.path.join(self.path, *name.split("/"))

    def init(self) -> None:
        """Create the store's directories, owner-only."""
        old = os.umask(0o077)
        try:
            for d in ("", "chunks", "snapshots", "tmp"):
                os.makedirs(os.path.join(self.path, d), mode=0o700, exist_ok=True)
            os.chmod(self.path, 0o700)
        finally:
            os.umask(old)

    def get(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise Missing(name) from None

    def put(self, name: str, data, *, durable: bool = True, if_absent: bool = False) -> bool:
        path = self._path(name)
        if if_absent and os.path.exists(path):
            return False
        if durable:
            fsutil.write_atomic(path, data)
            return True
        try:
            fsutil.write_renamed(path, self.tmp_dir, data)
        except OSError as exc:
            fsutil.raise_os_error(exc, path)
        return True

    def size(self, name: str) -> int | None:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        top = prefix.rstrip("/").split("/")[0] if "/" in prefix else ""
        root = os.path.join(self.path, top) if top else self.path
        for dirpath, dirs, names in os.walk(root):
            rel = os.path.relpath(dirpath, self.path)
            if rel == "tmp" or rel.startswith("tmp/"):
                dirs[:] = []
                continue
            for n in names:
                name = n if rel == "." else f"{rel}/{n}"
                if name.startswith(prefix):
                    try:
                        yield name, os.lstat(os.path.join(dirpath, n)).st_size
                    except FileNotFoundError:
                        continue

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            raise Missing(name) from None
        if name.startswith("snapshots/"):
            fsutil.fsync_dir(os.path.dirname(self._path(name)))

    def sync(self) -> None:
        fsutil.syncfs(self.path)

    def stale_temps(self) -> list[str]:
        # Only files: a directory here is a dump or restore work dir (when /dev/shm is
        # unusable) that a restore may still be reading after it dropped its lock.
        try:
            names = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            return []
        return [f"tmp/{n}" for n in names
                if os.path.isfile(os.path.join(self.tmp_dir, n))
                and not os.path.islink(os.path.join(self.tmp_dir, n))]

    def lock(self, *, exclusive: bool, timeout: float):
        return store_lock(os.path.join(self.path, "lock"), exclusive=exclusive, timeout=timeout)

    def check_private(self) -> None:
        st = os.stat(self.path)
        if st.st_uid != os.geteuid():
            raise InsecureStore(f"store {self.path} belongs to uid {st.st_uid}, not to you")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InsecureStore(f"store {self.path} is open to other users (mode {st.st_mode & 0o777:o})",
                                hint=f"chmod 700 {self.path}")
