"""Materialise: write a snapshot's files from the store, each chunk verified as it lands.

Chunks are decoded straight into a shared mapping of their file (no copy through a
buffer, and every worker faults its own pages of one file in parallel, where pwrite()
would serialise on the file's lock), on worker processes (parallel.py says why).

Zero chunks are left as holes. Any mismatch raises IntegrityError; the caller removes
the destination.

Each chunk's range is reserved (fallocate) before it is written through the mapping: a
write through a mapping that finds the filesystem full gets SIGBUS, which would kill
gpusnap (or a worker) without a word. Reserved first, a full work dir is StoreFull,
naming where.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import threading
import time
from typing import Callable

from ..errors import IntegrityError, StoreFull
from ..model import FileEntry
from . import codec, parallel

_maps: dict[str, tuple[int, memoryview]] = {}
_map_lock = threading.Lock()


def write_files(repo, entries: list[FileEntry], dest: str, workers: int,
                progress: Callable[[int], None] | None = None,
                only: dict[str, list[tuple[int, int]]] | None = None) -> dict:
    """Write entries (manifest file entries) under dest. Returns timing statistics.

    only: for the paths it names, just the chunks that overlap these (offset, length)
    ranges are written; the rest of such a file stays a hole (the uffd page path fills
    those pages into the restored process instead)."""
    try:
        os.makedirs(dest, mode=0o700, exist_ok=True)
        paths, chunks = _create(entries, dest, only or {})
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _full(dest) from None
        raise
    batches = parallel.batches(chunks, lambda c: c[3])
    wall = time.perf_counter()
    read_s = decode_s = 0.0
    mode, results = parallel.run(_fill, (repo, paths, batches), len(batches), workers)
    try:
        for done, r, d in results:
            read_s, decode_s = read_s + r, decode_s + d
            if progress:
                progress(done)
    finally:
        results.close()
        _close_maps()               # threads share this process's mappings
    return {"chunks": len(chunks), "workers": workers, "mode": mode,
            "wall_s": round(time.perf_counter() - wall, 4),
            "read_worker_s": round(read_s, 4), "decode_write_worker_s": round(decode_s, 4)}


def _create(entries: list[FileEntry], dest: str, only: dict) -> tuple[list[str], list[tuple]]:
    """Create every file at its size (sparse); the chunks to write: (file, off, id, n).
    The entries are validated (model.manifest: relative paths, none under another, chunks
    adding up to the size); a symlink in dest still cannot lead a file out of it."""
    real_dest = os.path.realpath(dest) + os.sep
    paths, chunks = [], []
    for entry in entries:
        path = os.path.join(dest, entry.path)
        if not os.path.realpath(path).startswith(real_dest):
            raise IntegrityError(f"manifest path escapes the image dir: {entry.path}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     entry.mode & 0o700 or 0o600)
        try:
            os.ftruncate(fd, entry.size)
        finally:
            os.close(fd)
        index = len(paths)
        paths.append(path)
        off = 0
        wanted = only.get(entry.path)
        for cid, n in entry.chunks:
            if cid != codec.ZERO_ID and (wanted is None or _overlaps(wanted, off, n)):
                chunks.append((index, off, cid, n))
            off += n
    return paths, chunks


def _overlaps(ranges: list[tuple[int, int]], off: int, n: int) -> bool:
    """Whether [off, off+n) meets one of ranges (sorted, not overlapping)."""
    i = bisect.bisect_left(ranges, (off + n,)) - 1
    return i >= 0 and ranges[i][0] + ranges[i][1] > off


def _full(where: str) -> StoreFull:
    return StoreFull(f"no space left in the work dir while writing the images to {where}",
                     hint="free space there, or point GPUSNAP_WORKDIR at a larger filesystem")


def _view(path: str) -> tuple[int, memoryview]:
    """This process's fd and shared mapping of path (opened once; threads share them)."""
    with _map_lock:
        opened = _maps.get(path)
        if opened is None:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                view = memoryview(mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED))
            except BaseException:
                os.close(fd)
                raise
            opened = _maps[path] = (fd, view)
        return opened


def _reserve(fd: int, off: int, n: int, path: str) -> None:
    """Allocate [off, off+n) of the file before it is written through the mapping."""
    try:
        os.posix_fallocate(fd, off, n)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _full(path) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def _fill(job, batch_index: int) -> tuple[int, float, float]:
    repo, paths, batches = job
    done = read_s = decode_s = 0
    batch = batches[batch_index]
    blobs = repo.read_blobs([cid for _i, _o, cid, _n in batch])     # a remote store reads ahead
    for index, off, cid, n in batch:
        started = time.perf_counter()
        blob = next(blobs)
        read = time.perf_counter()
        fd, view = _view(paths[index])
        _reserve(fd, off, n, paths[index])
        with view[off:off + n] as out:
            repo.decode_chunk(blob, cid, n, out, check="frame")
        read_s += read - started
        decode_s += time.perf_counter() - read
        done += n
    return done, read_s, decode_s


def _close_maps() -> None:
    with _map_lock:
        for fd, view in _maps.values():
            obj = view.obj
            view.release()
            obj.close()
            os.close(fd)
        _maps.clear()
