"""Chunk codec: plain bytes <-> stored bytes. Chunk ids hash the plain bytes (as borg does),
so dedup works whatever the compression level, and every read is verified."""

from __future__ import annotations

import hashlib
import threading

import zstandard

from ..errors import IntegrityError

ZERO_ID = "zero"          # an all-zero chunk: never stored, restored as a hole
_local = threading.local()


def chunk_id(data) -> str:
    return hashlib.sha256(data).hexdigest()


def is_zero(data: memoryview) -> bool:
    """One memcmp against a zero buffer, without copying (bytes.startswith takes any buffer;
    memoryview's own == compares byte by byte, about 15 times slower)."""
    zeros = getattr(_local, "zeros", None)
    if zeros is None or len(zeros) < len(data):
        zeros = _local.zeros = bytes(max(len(data), 1 << 20))
    return zeros.startswith(data)


def compress(data, level: int = 1) -> bytes:
    cctx = getattr(_local, "cctx", None)
    if cctx is None or getattr(_local, "level", None) != level:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        _local.level = level
    return cctx.compress(data)


def decompress(blob: bytes, expected_id: str, size: int) -> bytes:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    try:
        data = dctx.decompress(blob, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk {expected_id[:16]} does not decompress: {exc}") from None
    if len(data) != size or chunk_id(data) != expected_id:
        raise IntegrityError(f"chunk {expected_id[:16]} does not match its hash")
    return data


def scratch(size: int) -> memoryview:
    """A per-thread buffer reused chunk after chunk: fresh 1 MiB allocations cost page
    faults on every chunk, which dominated ingest and materialise (a VM's first-touch
    faults made it 50x slower than the copy itself)."""
    buf = getattr(_local, "scratch", None)
    if buf is None or len(buf) < size:
        buf = _local.scratch = bytearray(max(size, 1 << 20))
    return memoryview(buf)[:size]


def decompress_view(blob: bytes, expected_id: str, size: int) -> memoryview:
    """Like decompress(), into this thread's scratch buffer: valid until its next use."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    out = scratch(size)
    got = 0
    try:
        with dctx.stream_reader(blob) as reader:
            while got < size:
                n = reader.readinto(out[got:])
                if not n:
                    break
                got += n
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk {expected_id[:16]} does not decompress: {exc}") from None
    if got != size or extra or chunk_id(out) != expected_id:
        raise IntegrityError(f"chunk {expected_id[:16]} does not match its hash")
    return out
