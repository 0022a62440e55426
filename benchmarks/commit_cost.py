"""What making a dump durable costs: fsync as the workers write (gpusnap now) beside one
syncfs(2) of the store's filesystem after ingest (gpusnap before).

    python benchmarks/commit_cost.py [--mib 1024] [--runs 3] [--dir DIR] [--out benchmarks/results]
                                     [--tag cpu]

Same images for both (--mib of half-compressible data on /dev/shm, as CRIU's images sit
in gpusnap's tmpfs work dir), a fresh store under DIR (default /var/tmp: a disk, not a
tmpfs) for each run. Per mode, medians of --runs: ingest (chunk, compress, write: now
with the fsyncs), commit (now: fsync the chunk directories, then the manifest; before:
syncfs, then the manifest), and their sum; then a second dump of the same images into
the same store (everything deduplicated: what a re-dump of a barely changed target pays
for durability). The "before" mode is the store as it was: the same LocalBackend with
plain renames and a syncfs. Writes OUT/commit_cost_TAG.md and .json (TAG: the host's
kind, cpu by default).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpusnap.model import Manifest, Target  # noqa: E402
from gpusnap.store import Repository, fsutil  # noqa: E402
from gpusnap.store.backends.local import LocalBackend  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)


class SyncfsBackend(LocalBackend):
    """The local store as it was: chunks renamed into place unsynced, one syncfs at commit."""
    batches_puts = False

    def put(self, name, data, *, durable=True, if_absent=False):
        if durable or if_absent:
            return super().put(name, data, durable=durable, if_absent=if_absent)
        fsutil.write_renamed(self._path(name), self.tmp_dir, data)
        return True

    def sync(self, names=()):
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), "syncfs failed")
        finally:
            os.close(fd)


def make_images(path: str, mib: int) -> None:
    """Files like a server's images: half random, half repeated text (compresses ~2x)."""
    os.makedirs(path)
    rnd = random.Random(7)
    for i in range(max(1, mib // 256)):
        with open(os.path.join(path, f"pages-{i + 1}.img"), "wb") as f:
            for _ in range(min(256, mib) * 4):                  # 256 KiB pieces
                f.write(rnd.randbytes(128 << 10))
                f.write((b"tensor %08d " % rnd.randrange(10 ** 8)) * ((128 << 10) // 16))
    with open(os.path.join(path, "core-1.img"), "wb") as f:
        f.write(b"core" * 1000)


def dump_once(repo: Repository, images: str) -> dict:
    t0 = time.perf_counter()
    files, counts = repo.ingest_dir(images)
    t1 = time.perf_counter()
    repo.commit(Manifest(target=Target("process", 1, [1]), pids=[1], files=files, **counts))
    t2 = time.perf_counter()
    return {"ingest": t1 - t0, "commit": t2 - t1, "total": t2 - t0,
            "bytes_new": counts["bytes_new"]}


def one_run(mode: str, base: str, images: str) -> dict:
    store = tempfile.mkdtemp(prefix=f"commit-{mode}-", dir=base)
    os.rmdir(store)
    try:
        repo = Repository.open(store)
        if mode == "before":
            repo = Repository(store, repo.codec, SyncfsBackend(store))
        os.sync()                       # nothing of earlier runs left for this one to flush
        return {"first": dump_once(repo, images), "second": dump_once(repo, images)}
    finally:
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="commit-cost-", dir="/dev/shm")
    images = os.path.join(work, "images")
    try:
        make_images(images, args.mib)
        runs = {mode: [] for mode in ("before", "now")}
        for _ in range(args.runs):
            for mode in runs:                   # interleaved: both see the same disk state
                runs[mode].append(one_run(mode, args.dir, images))
                print(mode, json.dumps(runs[mode][-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(args, runs)


def med(runs: list, which: str, key: str) -> float:
    return statistics.median(r[which][key] for r in runs)


def write(args, runs: dict) -> None:
    host = f"{platform.node()}, {os.cpu_count()} CPUs, store under {args.dir}"
    lines = [f"# Commit cost: fsync as ingest writes vs one syncfs after it ({args.mib} MiB)", "",
             f"{host}; medians of {args.runs} runs (`benchmarks/commit_cost.py`). Seconds.", "",
             "| mode | ingest | commit | ingest + commit | 2nd dump (all dedup): ingest | commit |",
             "|---|---|---|---|---|---|"]
    names = {"before": "syncfs after ingest (before)", "now": "fsync in the workers (now)"}
    for mode, rs in runs.items():
        lines.append(f"| {names[mode]} | {med(rs, 'first', 'ingest'):.2f} | "
                     f"{med(rs, 'first', 'commit'):.3f} | {med(rs, 'first', 'total'):.2f} | "
                     f"{med(rs, 'second', 'ingest'):.2f} | {med(rs, 'second', 'commit'):.3f} |")
    lines += ["", "ingest now includes the workers' fsyncs (the disk writes while they compress); "
              "commit is what a dump waits for after ingest. A second dump stores nothing new: "
              "its commit is the directory fsyncs alone (before: a syncfs with nothing to flush)."]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"commit_cost_{args.tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"commit_cost_{args.tag}.json"), "w") as f:
        json.dump({"host": host, "mib": args.mib, "runs": runs}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
