"""Where does materialise (store -> CRIU image files on tmpfs) spend its time?

    sudo .venv/bin/python benchmarks/materialise.py [--gib 2] [--runs 3] [--threads 4,8,16]

Builds an image directory of GIB (half random bytes like weights, half repetitive like a
heap), ingests it into a store on disk through the real ingest path, then materialises
it with the real Repository.materialise into:

    shm      /dev/shm (tmpfs, 4 KiB pages: the pre-0.2 default)
    huge     a tmpfs mounted with huge=always (what gpusnap mounts at /run/gpusnap-work)

with several worker counts (processes: gpusnap.store.parallel), store chunks in page
cache (as after a dump on this host). Ingest (the dump side) is timed once too. Also one run from cold disk
(page cache dropped). Prints a markdown table (medians), writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.gds import drop_caches  # noqa: E402  (importing gds loads no GPU library)
from gpusnap.engine import workdir  # noqa: E402
from gpusnap.model import Manifest, Target  # noqa: E402
from gpusnap.store import Repository  # noqa: E402

HUGE = "/run/gpusnap-matbench"


def make_images(path: str, gib: float) -> None:
    os.makedirs(path)
    block = os.urandom(1 << 20)
    heap = (b"gpusnap heap object %08d " * 40000)[:1 << 20]
    with open(os.path.join(path, "pages-1.img"), "wb") as f:
        for i in range(int(gib * 1024)):
            if i % 2:
                f.write(i.to_bytes(8, "little") + heap[8:])
            else:
                f.write(i.to_bytes(8, "little") + os.urandom(4096) + block[4104:])
    with open(os.path.join(path, "mm-1.img"), "wb") as f:
        f.write(os.urandom(64 << 10))


def mount_huge() -> str | None:
    os.makedirs(HUGE, exist_ok=True)
    if workdir.tmpfs_options(HUGE) is None:
        rc = os.system(f"mount -t tmpfs -o mode=0700,huge=always gpusnap-matbench {HUGE}")
        if rc:
            return None
    return HUGE


def one(repo: Repository, manifest: dict, base: str, threads: int) -> dict:
    os.environ["GPUSNAP_THREADS"] = str(threads)
    dest = tempfile.mkdtemp(dir=base)
    try:
        t = time.perf_counter()
        repo.materialise(manifest, os.path.join(dest, "images"))
        wall = time.perf_counter() - t
    finally:
        shutil.rmtree(dest)
    stats = repo.last_materialise
    return {"s": wall, "mode": stats["mode"], "read_worker_s": stats["read_worker_s"],
            "decode_write_worker_s": stats["decode_write_worker_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="4,8,16")
    ap.add_argument("--out", help="directory for materialise_<host>.json")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    top = tempfile.mkdtemp(prefix="gpusnap-matbench-", dir="/var/tmp")
    try:
        make_images(os.path.join(top, "images"), args.gib)
        repo = Repository.open(os.path.join(top, "store"))
        t = time.perf_counter()
        files, counts = repo.ingest_dir(os.path.join(top, "images"))
        ingest_s = time.perf_counter() - t
        manifest = Manifest(target=Target("process", 1, [1]), pids=[1], files=files)
        logical = counts["bytes_logical"]
        bases = {"shm": "/dev/shm"}
        huge = mount_huge()
        if huge:
            bases["huge"] = huge
        rows = []
        for name, base in bases.items():
            for n in threads:
                runs = [one(repo, manifest, base, n) for _ in range(args.runs)]
                med = statistics.median(r["s"] for r in runs)
                rows.append({"dest": name, "mode": runs[-1]["mode"], "workers": n, "s": round(med, 3),
                             "gbps": round(logical / med / 1e9, 2),
                             "read_worker_s": runs[-1]["read_worker_s"],
                             "decode_write_worker_s": runs[-1]["decode_write_worker_s"]})
                print(rows[-1], flush=True)
        best = max(rows, key=lambda r: r["gbps"])
        if drop_caches():
            cold = one(repo, manifest, bases[best["dest"]], best["workers"])
            rows.append({"dest": best["dest"] + " (cold disk)", "mode": cold["mode"],
                         "workers": best["workers"], "s": round(cold["s"], 3),
                         "gbps": round(logical / cold["s"] / 1e9, 2),
                         "read_worker_s": cold["read_worker_s"],
                         "decode_write_worker_s": cold["decode_write_worker_s"]})
        host = platform.node()
        print(f"\n# materialise, {logical / 1e9:.2f} GB image ({counts['bytes_stored'] / 1e9:.2f} GB "
              f"stored), {os.cpu_count()} CPUs, host {host}; ingest into a new store "
              f"{ingest_s:.2f} s ({logical / ingest_s / 1e9:.2f} GB/s)\n")
        print("| dest | workers | median s | GB/s | read worker-s | decode+write worker-s |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['dest']} | {r['workers']} {r['mode']} | {r['s']} | {r['gbps']} | "
                  f"{r['read_worker_s']} | {r['decode_write_worker_s']} |")
        if args.out:
            with open(os.path.join(args.out, f"materialise_{host}.json"), "w") as f:
                json.dump({"logical": logical, "stored": counts["bytes_stored"],
                           "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    finally:
        shutil.rmtree(top, ignore_errors=True)
        if workdir.tmpfs_options(HUGE) is not None:
            os.system(f"umount {HUGE}")


if __name__ == "__main__":
    main()
