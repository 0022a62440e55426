"""`dump --compress` levels on bf16 model weights: stored size against compress and decode
speed, one core.

    python benchmarks/compress_levels.py [--mib 4] [--out benchmarks/results]

Weights like a transformer's (normal(0, 0.02) as bf16, what tests/workloads/llm_server.py
makes), each level through gpusnap's own codec (gpusnap.store.codec), 1 MiB chunks as a
dump stores them: ratio, compress GB/s, decode GB/s (what a restore's fill does: into a
reused buffer, verified by the frame checksum). bf16 is the byte-plane transform. Prints a
table and writes OUT/compress_levels_cpu.md.
"""

from __future__ import annotations

import argparse
import array
import os
import platform
import random
import time

import sys

import zstandard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpusnap.store import codec  # noqa: E402

LEVELS = [("1 (the old default)", 1), ("3", 3), ("fast (-1, the default)", codec.FAST), ("-5", -5),
          ("none", codec.NO_COMPRESSION), ("bf16 (byte planes, codec.PLANES_PARAMS)", codec.BF16),
          ("bf16 as before 2026-12-03 (byte planes, level 1, bytes' slicing)", "planes_level1")]


def _planes_level1(chunk) -> bytes:
    """The byte planes as `--compress bf16` wrote them before codec.PLANES_PARAMS: bytes'
    strided slicing, zstd level 1 (the same format: codec's decoder reads both)."""
    cctx = _planes_level1.__dict__.setdefault(
        "cctx", zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=True))
    data = bytes(chunk)
    return codec.PLANES_HEAD + cctx.compress(data[0::2] + data[1::2])


def _compress(chunk, level) -> bytes:
    return _planes_level1(chunk) if level == "planes_level1" else codec.compress(chunk, level)
CHUNK = 1 << 20


def bf16_weights(mib: int) -> bytes:
    rnd = random.Random(1)
    vals = array.array("f", (rnd.gauss(0, 0.02) for _ in range(mib << 18)))
    raw = memoryview(vals.tobytes()).cast("H")
    return raw[1::2].tobytes()          # little-endian float32: the high half is the bf16


def rate(fn, nbytes: int, repeat: int) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return nbytes * repeat / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    data = bf16_weights(args.mib)
    lines = [f"# zstd levels on bf16 weights — {platform.node()} ({os.cpu_count()} cores), one core", "",
             f"{len(data) >> 20} MiB of normal(0, 0.02) bf16 values in 1 MiB chunks, through "
             "gpusnap.store.codec (frames with content checksums; decode into a reused buffer). "
             f"numpy {'installed' if codec._numpy() else 'not installed'} (bf16's planes split "
             "and joined with it where it is). `python benchmarks/compress_levels.py`.", "",
             "| level | stored / plain | compress GB/s | decompress GB/s |", "|---|---|---|---|"]
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    ids = [codec.chunk_id(c) for c in chunks]
    out = memoryview(bytearray(CHUNK))
    for label, level in LEVELS:
        blobs = [_compress(c, level) for c in chunks]

        def decode():
            for blob, cid, c in zip(blobs, ids, chunks):
                codec.PLAIN.decode_view(blob, cid, len(c), out[:len(c)], check="frame")
        lines.append(f"| {label} | {sum(map(len, blobs)) / len(data):.3f} | "
                     f"{rate(lambda: [_compress(c, level) for c in chunks], len(data), 5):.2f} | "
                     f"{rate(decode, len(data), 20):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compress_levels_cpu.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
