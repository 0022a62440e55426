"""The local pull-through cache of a remote store's chunks.

    <cache dir>/<store key>/packs/<xx>/<id>    a pack of the store as stored, whole: its
                                               chunks are read out of it by offset, where
                                               the store's index says (backends/packs.py)
    <cache dir>/<store key>/chunks/<xx>/<id>   a chunk as stored (compressed; encrypted in
                                               an encrypted store), where it came alone (a
                                               range read of a pack too large to keep)
    <cache dir>/<store key>/index/<pack id>    index objects of the store's packs, and
                   index/bundle-<id>           bundles (they never change: each is read
                                               from the store once a node)
    <cache dir>/<store key>/packlocks/<xxx>    flock(2) files: one process fetches a pack
                                               while the others wait for its chunks
    <cache dir>/<store key>/tmp/               index objects being written; dump/restore
                                               scratch when no tmpfs is usable; failed-logs/
                                               (a chunk is written beside its name, then
                                               renamed to it)

(<store key>: 16 hex digits of the sha256 of the store's URL.) A pack enters the cache
whole once its bytes matched the pack's id (a restore reads a chunk's neighbours next),
or when this node made it (a dump); a chunk alone when a decode checked it against its
id. Every read from the cache is checked again by the decode, like any read, and what
fails there is dropped and read from the store once more (Repository.decode_chunk): the
cache is not fsynced, so a host's crash can leave a torn file in it. The bytes
are the stored encoding, so an encrypted store's cache is as opaque as the bucket.
Why packs whole: a 1.3B server's snapshot is ~10,000 chunks in ~120 packs, and a file
each cost a create, a rename and later an open and a read each (on the H200 host the
prefetch helpers spent 4.4 thread-seconds a GB writing chunk files, against 5.4 in the
GETs themselves: s3_pull_h200_1024mib_split.md).

Bounded by max_bytes (--cache-size): least recently used first out (a hit bumps the
file's mtime, a pack's once a process). Each process keeps a running total from one scan
when it opens the cache and evicts to 90 % of the bound when a write takes it over; a
write that meets a full disk evicts and tries once more, then gives up quietly (the cache
is an optimisation: restores still work, straight from the store).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import threading
from typing import Iterator

from ..errors import InsecureStore, UsageError
from . import fsutil

DEFAULT_DIR = "/var/cache/gpusnap"
DEFAULT_SIZE = 20 << 30
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int | None) -> int:
    """'20G', '512M', '1048576' -> bytes (binary units)."""
    if text is None or text == "":
        return DEFAULT_SIZE
    if isinstance(text, int):
        return text
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS and not t[-1:].isdigit() else ""
    try:
        return int(float(t[:len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise UsageError(f"not a size: {text!r}", hint="e.g. 20G, 512M") from None


def store_dir(cache_dir: str, url: str) -> str:
    return os.path.join(os.path.abspath(cache_dir), hashlib.sha256(url.encode()).hexdigest()[:16])


class ChunkCache:
    def __init__(self, root: str, max_bytes: int = DEFAULT_SIZE):
        self.root = root
        self.chunks = os.path.join(root, "chunks")
        self.packs = os.path.join(root, "packs")
        self.tmp = os.path.join(root, "tmp")
        self.index = os.path.join(root, "index")
        self.locks = os.path.join(root, "packlocks")
        self.max_bytes = max_bytes
        self._total: int | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._touched: set[str] = set()     # packs whose mtime this process bumped

    def open(self) -> "ChunkCache":
        """Create the cache directories (owner-only) and refuse one others can open."""
        old = os.umask(0o077)
        try:
            for d in (self.root, self.chunks, self.packs, self.tmp, self.index, self.locks):
                os.makedirs(d, mode=0o700, exist_ok=True)
        finally:
            os.umask(old)
        st = os.stat(self.root)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise InsecureStore(f"cache {self.root} is not a private directory of uid {os.geteuid()}",
                                hint=f"chmod 700 {self.root}, or point --cache elsewhere")
        return self

    def path(self, cid: str) -> str:
        return os.path.join(self.chunks, cid[:2], cid)

    def get(self, cid: str) -> bytes | None:
        path = self.path(cid)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)                  # most recently used
            return data
        except OSError:
            return None

    def has(self, cid: str) -> bool:
        return os.path.exists(self.path(cid))

    def pack_path(self, pack_id: str) -> str:
        return os.path.join(self.packs, pack_id[:2], pack_id)

    def has_pack(self, pack_id: str) -> bool:
        return os.path.exists(self.pack_path(pack_id))

    def get_range(self, pack_id: str, offset: int, length: int) -> bytes | None:
        """length bytes at offset of a kept pack (a chunk of it); None when the pack is
        not here (or shorter: then it is no pack of ours)."""
        path = self.pack_path(pack_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            data = os.pread(fd, length, offset)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(data) != length:             # torn (the cache is not fsynced): not ours
            self.drop_pack(pack_id)
            return None
        if pack_id not in self._touched:
            self._touched.add(pack_id)
            with contextlib.suppress(OSError):
                os.utime(path)              # most recently used
        return data

    def drop(self, cid: str) -> None:
        """Forget a chunk kept alone (one whose bytes failed their check)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(cid))

    def drop_pack(self, pack_id: str) -> None:
        """Forget a kept pack (torn, or a chunk of it failed its check)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pack_path(pack_id))

    def put_pack(self, pack_id: str, data) -> bool:
        """Keep a pack whose bytes matched its id; False when it could not be kept."""
        return self._keep(self.pack_path(pack_id), data)

    def put(self, cid: str, blob) -> bool:
        """Keep a verified chunk; False when it could not be kept (disk full)."""
        return self._keep(self.path(cid), blob)

    def _keep(self, path: str, blob) -> bool:
        if os.path.exists(path):
            return True
        for attempt in (0, 1):
            try:
                # the temp file beside its name: on the H200 host 16 writers through one
                # shared tmp/ moved 1.69 GiB/s, through the 256 chunk directories 2.67
                # (write_probe_h200.md); a writer killed leaves it there, evicted like a chunk
                fsutil.write_renamed(path, os.path.dirname(path), blob)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or attempt:
                    return False
                self.evict(self._usage() // 2)
        with self._lock:
            self._total = self._usage() + len(blob)
            over = self._total > self.max_bytes
        if over:
            self.evict(int(self.max_bytes * 0.9))
        return True

    def get_index(self, pack_id: str) -> bytes | None:
        """A pack's index object as fetched before (untrusted like the store's copy)."""
        try:
            with open(os.path.join(self.index, pack_id), "rb") as f:
                return f.read()
        except OSError:
            return None

    def put_index(self, pack_id: str, raw: bytes) -> None:
        """Keep a pack's index object; quietly not, when the disk is full."""
        with contextlib.suppress(OSError):
            fsutil.write_renamed(os.path.join(self.index, pack_id), self.tmp, raw)

    def drop_index(self, pack_id: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.index, pack_id))

    @contextlib.contextmanager
    def pack_lock(self, pack_id: str) -> Iterator[None]:
        """Held while one process (or thread) fetches a pack into the cache: another that
        needs a chunk of it waits, then finds the chunk here. At most 4096 lock files."""
        try:
            fd = os.open(os.path.join(self.locks, pack_id[:3]),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:                     # no lock file (a full disk): fetch unlocked
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _usage(self) -> int:
        if self._total is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._total = sum(size for _p, size, _t in self._entries())
        return self._total

    def _entries(self) -> Iterator[tuple[str, int, float]]:
        for top in (self.chunks, self.packs):
            for dirpath, _dirs, names in os.walk(top):
                for n in names:
                    p = os.path.join(dirpath, n)
                    try:
                        st = os.stat(p)
                    except FileNotFoundError:
                        continue
                    yield p, st.st_size, st.st_mtime

    def evict(self, target: int) -> int:
        """Remove least recently used chunks and packs until the cache holds at most
        target bytes. Returns the bytes freed."""
        entries = sorted(self._entries(), key=lambda e: e[2])
        total = sum(size for _p, size, _t in entries)
        freed = 0
        for p, size, _t in entries:
            if total - freed <= target:
                break
            try:
                os.unlink(p)
                freed += size
            except FileNotFoundError:
                pass
        with self._lock:
            self._total = total - freed
        return freed

    def usage(self) -> int:
        """Bytes held now (a fresh scan)."""
        self._total = None
        return self._usage()
