"""A store in a local directory: the layout of docs/design.md, flock(2) for locks.

Chunks are written to tmp/ under a name unique to the writer, fsynced and renamed into
place, a batch at a time by ingest's workers (the disk writes while they compress): a
chunk's bytes are durable whenever its name exists. sync(names) then fsyncs the
directories holding those names, which makes the names durable too, whoever wrote them
(docs/design.md, "Write ordering"). Other objects are written atomically with fsync
(fsutil.write_atomic).
"""

from __future__ import annotations

import fcntl
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

from ...errors import InsecureStore, StoreError
from .. import fsutil
from ..lock import store_lock
from .base import Backend, Missing


DIRECT_IO_ENV = "GPUSNAP_DIRECT_IO"


class LocalBackend(Backend):
    batches_puts = True         # a batch's chunks are fsynced together (put_many)

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.url = self.path
        self.tmp_dir = os.path.join(self.path, "tmp")
        # chunks written past the page cache (experimental; see fsutil.write_renamed_many)
        self.direct = os.environ.get(DIRECT_IO_ENV) == "1"

    def _path(self, name: str) -> str:
        return os.path.join(self.path, *name.split("/"))

    def init(self) -> None:
        """The store's directories in a missing or empty private directory (created 0700
        if missing; an existing one is checked, never chmodded)."""
        try:
            self._make()
        except OSError as exc:
            fsutil.raise_os_error(exc, self.path)

    def _make(self) -> None:
        subdirs = ("chunks", "snapshots", "tmp")
        if not fsutil.make_private_dir(self.path, "store") and not all(
                n in subdirs or n.startswith("config.tmp-") for n in os.listdir(self.path)):
            raise StoreError(f"{self.path} is not empty and holds no gpusnap store",
                             hint="give a new or empty directory for a new store")
        fd = fsutil.open_dir_nofollow(self.path)
        try:
            for name in subdirs:            # another gpusnap creating this store may be first
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    fsutil.check_private_dir(os.path.join(self.path, name), "store directory",
                                             os.stat(name, dir_fd=fd, follow_symlinks=False))
        finally:
            os.close(fd)

    def get(self, name: str) -> bytes:
        try:
            with open(os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC),
                      "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise Missing(name) from None

    def put(self, name: str, data, *, durable: bool = True, if_absent: bool = False) -> bool:
        path = self._path(name)
        if if_absent and os.path.lexists(path):
            return False
        if durable:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)    # seeds/: made at first use
            fsutil.write_atomic(path, data)
            return True
        self.put_many([(name, data)])
        return True

    def put_many(self, items: list[tuple[str, bytes]]) -> set[str]:
        """Each object's bytes durable before its name appears; the names are durable
        after sync(). Objects are written once (chunks: their name is their content's
        hash): a name that appeared since the caller looked (another writer at the same
        time, such as a dump and its --seed) is left as it is, not written twice.
        Returns those names."""
        present = {n for n, _d in items if os.path.lexists(self._path(n))}
        paths = [(self._path(n), d) for n, d in items if n not in present]
        if not paths:
            return present
        try:
            fsutil.write_renamed_many(paths, self.tmp_dir,
                                      fsync=True, direct=self.direct, beside=True)
        except OSError as exc:
            fsutil.raise_os_error(exc, exc.filename or self.path)
        return present

    def size(self, name: str) -> int | None:
        try:
            return os.lstat(self._path(name)).st_size
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
                if n.startswith(fsutil.TEMP_PREFIX):    # a write under way (put_many)
                    continue
                name = n if rel == "." else f"{rel}/{n}"
                if name.startswith(prefix):
                    try:
                        st = os.lstat(os.path.join(dirpath, n))
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode):        # a symlink is never followed
                        yield name, st.st_size

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            raise Missing(name) from None
        if name.startswith("snapshots/"):
            fsutil.fsync_dir(os.path.dirname(self._path(name)))

    def missing(self, names: Iterable[str]) -> list[str]:
        """The names that do not exist: one open per directory, then a stat relative to
        it per name (a commit checks every chunk of a snapshot: thousands)."""
        out = []
        for parent, bases in _by_dir(names).items():
            try:
                fd = os.open(self._path(parent) if parent else self.path,
                             os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                out += [f"{parent}/{b}" if parent else b for b in bases]
                continue
            try:
                for base in bases:
                    try:
                        os.stat(base, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        out.append(f"{parent}/{base}" if parent else base)
            finally:
                os.close(fd)
        return out

    def sync(self, names: Iterable[str] = ()) -> None:
        """fsync every directory on the way to the names (chunks/xx, then chunks): their
        entries are durable after it, whichever writer made them. A clean directory's
        fsync costs little (on ext4, a flush of the disk's write cache), so a chunk found
        already stored (dedup) is covered cheaply; its bytes were fsynced before its name
        appeared. The directories of one depth are fsynced by SYNC_THREADS threads at
        once (a snapshot's chunks sit in all 256 of chunks/xx: one after the other, their
        flushes queue; at once, the disk serves them together), deepest first."""
        dirs: set[str] = set()
        for parent in _by_dir(names):
            while parent and parent not in dirs:
                dirs.add(parent)
                parent = os.path.dirname(parent)
        try:
            for depth in sorted({d.count("/") for d in dirs}, reverse=True):
                level = sorted(d for d in dirs if d.count("/") == depth)
                _fsync_dirs([self._path(d) for d in level])
        except OSError as exc:
            fsutil.raise_os_error(exc, self.path)

    def stale_temps(self) -> list[str]:
        # Only files: a directory here is a dump or restore work dir (when /dev/shm is
        # unusable) that a restore may still be reading after it dropped its lock.
        # A chunk's temp file is written beside its name (put_many): chunks/xx/.tmp-*.
        out = self._files_in("tmp")
        for d in _subdirs(self._path("chunks")):
            out += self._files_in(f"chunks/{d}", fsutil.TEMP_PREFIX)
        return out

    def _files_in(self, top: str, prefix: str = "") -> list[str]:
        """The regular files (no link) directly in top whose names start with prefix."""
        try:
            names = os.listdir(self._path(top))
        except FileNotFoundError:
            return []
        return [f"{top}/{n}" for n in names if n.startswith(prefix)
                and os.path.isfile(os.path.join(self._path(top), n))
                and not os.path.islink(os.path.join(self._path(top), n))]

    def lock(self, *, exclusive: bool, timeout: float):
        return store_lock(os.path.join(self.path, "lock"), exclusive=exclusive, timeout=timeout)

    def check_private(self) -> None:
        """The store is ours alone and holds no symlink where gpusnap walks (gc deletes
        what it finds under chunks/ and tmp/)."""
        fsutil.check_private_dir(self.path, "store")
        links = fsutil.symlinks_under(self.path, depth=2)
        if links:
            raise InsecureStore(f"store {self.path} holds symbolic links ({', '.join(links[:3])}): "
                                f"gpusnap follows none inside a store",
                                hint="remove them; a store holds only its own files and directories")

    def require_writable(self) -> None:
        read_only = bool(os.statvfs(self.path).f_flag & os.ST_RDONLY)
        if read_only or not os.access(self.path, os.W_OK):
            raise StoreError(f"the store at {self.path} is read-only"
                             f"{' (a read-only mount)' if read_only else ''}; this command writes to it",
                             hint="ls, inspect, verify and export only read a store; "
                                  "--store names another")

    def next_seq(self, last_known: Callable[[], int]) -> int:
        """The next number of the store's commit sequence (file seq, under its own flock):
        strictly increasing, so "newest" never depends on clock resolution or skew."""
        fd = os.open(os.path.join(self.path, "seq"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            text = os.pread(fd, 32, 0).decode().strip()
            last = int(text) if text.isdigit() else last_known()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{last + 1}\n".encode(), 0)
            os.fsync(fd)
            return last + 1
        finally:
            os.close(fd)


SYNC_THREADS = 8


def _subdirs(path: str) -> list[str]:
    """The directories directly in path (no link followed); [] when path is missing."""
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _by_dir(names: Iterable[str]) -> dict[str, list[str]]:
    """names ("chunks/ab/abcd...") by the directory holding them: {"chunks/ab": ["abcd..."]}."""
    out: dict[str, list[str]] = {}
    for name in names:
        parent, _, base = name.rpartition("/")
        out.setdefault(parent, []).append(base)
    return out


def _fsync_dirs(paths: list[str]) -> None:
    """fsync_dir of each path, on up to SYNC_THREADS threads."""
    if len(paths) <= 1:
        for path in paths:
            fsutil.fsync_dir(path)
        return
    with ThreadPoolExecutor(min(SYNC_THREADS, len(paths))) as pool:
        list(pool.map(fsutil.fsync_dir, paths))     # raises the first OSError
