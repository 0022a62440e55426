"""zstd levels on bf16 model weights: stored size against compress and decode speed, one core.

    python benchmarks/compress_levels.py [--mib 4] [--out benchmarks/results]

Weights like a transformer's (normal(0, 0.02) as bf16, what tests/workloads/llm_server.py
makes), one chunk-sized buffer, each level: ratio, compress GB/s, decompress GB/s (the
restore's decode, with the frame checksum gpusnap writes). Prints a table and writes
OUT/compress_levels_cpu.md.
"""

from __future__ import annotations

import argparse
import array
import os
import platform
import random
import time

import zstandard

LEVELS = [("1 (the old default)", 1), ("3", 3), ("fast (-1, the default)", -1), ("-5", -5),
          ("none", -(1 << 17))]


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
             f"{len(data) >> 20} MiB of normal(0, 0.02) bf16 values, frames with content checksums. "
             "`python benchmarks/compress_levels.py`.", "",
             "| level | stored / plain | compress GB/s | decompress GB/s |", "|---|---|---|---|"]
    for label, level in LEVELS:
        c = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        d = zstandard.ZstdDecompressor()
        blob = c.compress(data)
        lines.append(f"| {label} | {len(blob) / len(data):.3f} | {rate(lambda: c.compress(data), len(data), 5):.2f} | "
                     f"{rate(lambda: d.decompress(blob), len(data), 20):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compress_levels_cpu.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
