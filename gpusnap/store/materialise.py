"""Materialise: write a snapshot's files from the store, each chunk verified as it lands.

Chunks are decoded straight into a shared mapping of their file (no copy through a
buffer, and every worker faults its own pages of one file in parallel, where pwrite()
would serialise on the file's lock), on worker processes (parallel.py says why).

Zero chunks are left as holes. Any mismatch raises IntegrityError; the caller removes
the destination.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Callable

from ..errors import IntegrityError
from . import codec, parallel

_maps: dict[str, memoryview] = {}
_map_lock = threading.Lock()


def write_files(repo, entries: list[dict], dest: str, workers: int,
                progress: Callable[[int], None] | None = None) -> dict:
    """Write entries (manifest file entries) under dest. Returns timing statistics."""
    os.makedirs(dest, mode=0o700, exist_ok=True)
    paths, chunks = _create(entries, dest)
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


def _create(entries: list[dict], dest: str) -> tuple[list[str], list[tuple]]:
    """Create every file at its size (sparse); the chunks to write: (file, off, id, n)."""
    real_dest = os.path.realpath(dest) + os.sep
    paths, chunks = [], []
    for entry in entries:
        path = os.path.join(dest, entry["path"])
        if not os.path.realpath(path).startswith(real_dest):
            raise IntegrityError(f"manifest path escapes the image dir: {entry['path']}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     entry.get("mode", 0o600) & 0o700 or 0o600)
        try:
            os.ftruncate(fd, entry["size"])
        finally:
            os.close(fd)
        index = len(paths)
        paths.append(path)
        off = 0
        for cid, n in entry["chunks"]:
            if cid != codec.ZERO_ID:
                chunks.append((index, off, cid, n))
            off += n
        if off != entry["size"]:
            raise IntegrityError(f"{entry['path']}: chunks add up to {off}, not {entry['size']}")
    return paths, chunks


def _view(path: str) -> memoryview:
    """This process's shared mapping of path (opened once; threads share it)."""
    with _map_lock:
        view = _maps.get(path)
        if view is None:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                view = _maps[path] = memoryview(mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED))
            finally:
                os.close(fd)
        return view


def _fill(job, batch_index: int) -> tuple[int, float, float]:
    repo, paths, batches = job
    done = read_s = decode_s = 0
    batch = batches[batch_index]
    blobs = repo.read_blobs([cid for _i, _o, cid, _n in batch])     # a remote store reads ahead
    for index, off, cid, n in batch:
        started = time.perf_counter()
        blob = next(blobs)
        read = time.perf_counter()
        with _view(paths[index])[off:off + n] as out:
            repo.codec.decode_view(blob, cid, n, out)
        repo.verified(cid, blob)
        read_s += read - started
        decode_s += time.perf_counter() - read
        done += n
    return done, read_s, decode_s


def _close_maps() -> None:
    with _map_lock:
        for view in _maps.values():
            obj = view.obj
            view.release()
            obj.close()
        _maps.clear()
