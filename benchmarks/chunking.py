"""Which chunking keeps dedup when memory layout shifts? Measured on real CRIU images.

    python benchmarks/chunking.py [--mib 256]

Dumps processes that hold the same data in one anonymous mapping: once twice (no
change), once with the data starting 3 pages later inside its mapping (what a changed
allocation before it does, or the CUDA driver laying out its host copy anew), and once
100 bytes later (a shift that is not a whole number of pages). For each chunking candidate it reports the share of the
second image's bytes that lie in chunks the first image already has (what dedup saves):

    fixed      1 MiB cuts from the start of each pages image
    regions    cuts at every memory region's start (from the pagemap), 1 MiB inside
    regions+cd the same, and inside a region at content-defined page boundaries (gpusnap)

Zero pages are elided first, as gpusnap's dump does. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpusnap.criu import runner  # noqa: E402
from gpusnap.criu.argv import CriuOptions  # noqa: E402
from gpusnap.imagefile import pagemap, zero_pages  # noqa: E402
from gpusnap.store import chunker  # noqa: E402


HOLDER = """
import mmap, os, random, sys, time
mib, shift = int(sys.argv[1]), int(sys.argv[2])
block = random.Random(1).randbytes(1 << 20)
m = mmap.mmap(-1, (mib << 20) + shift + 4096 * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:shift] = random.Random(2).randbytes(shift)      # non-zero: zero pages would be elided
for i in range(mib):
    m[shift + (i << 20):shift + ((i + 1) << 20)] = bytes([i % 251]) * 64 + block[64:]
del block
open(sys.argv[3], "w").close()
while True:
    time.sleep(1)
"""


def holder(state, mib, shift_bytes):
    os.makedirs(state)
    ready = os.path.join(state, "ready")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(mib), str(shift_bytes), ready],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while not os.path.exists(ready):
        time.sleep(0.05)
    return proc


def dump(proc, images):
    os.makedirs(images)
    runner.dump(proc.pid, images, CriuOptions(), leave="running")
    zero_pages.elide(images)


def spans(path, size, how):
    if how == "fixed":
        return [(o, min(chunker.CHUNK_SIZE, size - o)) for o in range(0, size, chunker.CHUNK_SIZE)]
    starts = sorted({o for o in pagemap.region_offsets_for_pages(path) if 0 <= o < size} | {0})
    if how == "regions":
        out = []
        for i, s in enumerate(starts):
            e = starts[i + 1] if i + 1 < len(starts) else size
            out += [(o, min(chunker.CHUNK_SIZE, e - o)) for o in range(s, e, chunker.CHUNK_SIZE)]
        return out
    return chunker.boundaries(path, size)


def chunks(images, how):
    out = {}
    for name in os.listdir(images):
        if name.startswith("pages-"):
            path = os.path.join(images, name)
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                for off, n in spans(path, size, how):
                    f.seek(off)
                    out[hash(f.read(n))] = n
    return out


def shared(a, b):
    return sum(n for k, n in b.items() if k in a) / max(1, sum(b.values()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="chunking-", dir="/dev/shm")
    procs = []
    try:
        a = holder(os.path.join(work, "a"), args.mib, 0)
        b = holder(os.path.join(work, "b"), args.mib, 3 * 4096)
        c = holder(os.path.join(work, "c"), args.mib, 100)
        procs += [a, b, c]
        dump(a, os.path.join(work, "a1"))
        dump(a, os.path.join(work, "a2"))
        dump(b, os.path.join(work, "b1"))
        dump(c, os.path.join(work, "c1"))
        rows = []
        for how in ("fixed", "regions", "regions+cd"):
            ca, ca2, cb, cc = (chunks(os.path.join(work, d), how) for d in ("a1", "a2", "b1", "c1"))
            rows.append((how, shared(ca, ca2), shared(ca, cb), shared(ca, cc), len(cb),
                         sum(cb.values()) / max(1, len(cb))))
        print(f"Real CRIU images, {args.mib} MiB of data in one anonymous mapping (zero pages elided); "
              "share of the second image's bytes already stored by the first.\n")
        print("| chunking | same process again | data 3 pages later | data 100 bytes later | chunks | mean chunk KiB |")
        print("|---|---|---|---|---|---|")
        for how, same, pages3, bytes100, n, mean in rows:
            print(f"| {how} | {same:.1%} | {pages3:.1%} | {bytes100:.1%} | {n} | {mean / 1024:.0f} |")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
