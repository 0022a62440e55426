"""What encryption at rest costs: ingest and materialise GB/s, plain vs encrypted store.

    .venv/bin/python benchmarks/encryption.py [--mib 512] [--repeat 3] [--dir /dev/shm]

One image file of MIB (no zero pages: those cost nothing either way) is ingested into a
fresh store and materialised back, each in a fresh directory under DIR (default tmpfs,
so that the numbers are the codec's CPU cost, not a disk's), with the store's own thread
pool; the best of REPEAT runs is kept and every materialised file is compared with the
source. Two contents: random bytes (zstd cannot shrink them) and half-compressible
(each 1 MiB: 512 KiB random, 512 KiB of text). Also one thread's codec alone (encode,
decode_view) over in-memory chunks. Prints markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpusnap.model import Manifest, Target  # noqa: E402
from gpusnap.store import Repository, codec, keyfile  # noqa: E402
from gpusnap.store.parallel import workers as _threads  # noqa: E402

MIB = 1 << 20


def make_data(kind: str, mib: int) -> bytes:
    rnd = random.Random(11)
    if kind == "random":
        return b"".join(rnd.randbytes(MIB) for _ in range(mib))
    text = (b"the quick brown fox jumps over the lazy dog; " * 12000)[: MIB // 2]
    return b"".join(rnd.randbytes(MIB // 2) + text for _ in range(mib))


def one_run(base: str, src: str, data_hash: str, key_file: str | None) -> tuple[float, float, int]:
    work = tempfile.mkdtemp(dir=base)
    try:
        repo = Repository.open(os.path.join(work, "store"), key_file=key_file)
        start = time.perf_counter()
        files, counts = repo.ingest_dir(src)
        ingest = time.perf_counter() - start
        dest = os.path.join(work, "out")
        start = time.perf_counter()
        repo.materialise(Manifest(target=Target("process", 1, [1]), pids=[1], files=files), dest)
        materialise = time.perf_counter() - start
        with open(os.path.join(dest, "pages-1.img"), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == data_hash, "materialised bytes differ"
        return ingest, materialise, counts["bytes_new"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def codec_alone(data: bytes, c: codec.PlainCodec, repeat: int) -> tuple[float, float]:
    """One thread: id + encode, and decode_view, GB/s over the data's 1 MiB chunks (best
    of repeat; the first pass also warms the per-thread buffers)."""
    chunks = [memoryview(data)[o:o + MIB] for o in range(0, len(data), MIB)]
    enc = dec = float("inf")
    for _ in range(repeat + 1):
        start = time.perf_counter()
        blobs = []
        for ch in chunks:
            cid = c.chunk_id(ch)
            blobs.append((cid, bytes(c.encode(cid, ch))))
        enc = min(enc, time.perf_counter() - start)
        start = time.perf_counter()
        for (cid, blob), ch in zip(blobs, chunks):
            c.decode_view(blob, cid, len(ch))
        dec = min(dec, time.perf_counter() - start)
    return len(data) / enc / 1e9, len(data) / dec / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()

    base = tempfile.mkdtemp(prefix="gpusnap-bench-enc-", dir=args.dir)
    try:
        key_file = os.path.join(base, "key")
        keyfile.generate(key_file)
        key = keyfile.load(key_file)
        print(f"Machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"store thread pool {_threads()}; files under {args.dir}; {args.mib} MiB per run, "
              f"best of {args.repeat}.\n")
        print("| content | store | ingest GB/s | materialise GB/s | stored MiB |")
        print("|:---|:---|---:|---:|---:|")
        alone = []
        for kind in ("random", "half-compressible"):
            data = make_data(kind, args.mib)
            src = os.path.join(base, "src")
            os.makedirs(src, exist_ok=True)
            with open(os.path.join(src, "pages-1.img"), "wb") as f:
                f.write(data)
            data_hash = hashlib.sha256(data).hexdigest()
            for label, kf in (("plain", None), ("encrypted", key_file)):
                runs = [one_run(base, src, data_hash, kf) for _ in range(args.repeat)]
                ingest = min(r[0] for r in runs)
                mat = min(r[1] for r in runs)
                print(f"| {kind} | {label} | {len(data) / ingest / 1e9:.2f} | "
                      f"{len(data) / mat / 1e9:.2f} | {runs[0][2] / MIB:.0f} |")
            for label, c in (("plain", codec.PLAIN), ("encrypted", codec.EncryptedCodec(key))):
                alone.append((kind, label, *codec_alone(data, c, args.repeat)))
            shutil.rmtree(src)
        print("\nOne thread, codec alone (in memory, 1 MiB chunks):\n")
        print("| content | codec | id + encode GB/s | decode + verify GB/s |")
        print("|:---|:---|---:|---:|")
        for kind, label, enc, dec in alone:
            print(f"| {kind} | {label} | {enc:.2f} | {dec:.2f} |")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
