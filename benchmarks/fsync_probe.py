"""How fast chunks become durable on this disk: an fsync a chunk against one journal commit
a batch (store/fsutil.py write_renamed_many, GPUSNAP_FSYNC=each | auto), each with its
temp files in one shared tmp/ and beside their final names (beside=True, the local
store's way since this probe).

    python benchmarks/fsync_probe.py [--dir /tmp] [--mib 2048] [--workers 16] [--runs 3] [--out DIR]

W forked writers (a dump's page-stream workers) each write their share of MIB in batches of
16 chunks of 1 MiB (a 16 MiB slot's chunks) spread over 256 directories, durable before
their names appear, as a dump's workers do; the modes alternate, a sync between runs. Prints GB/s per mode (medians) and
writes DIR/fsync_probe_<card>.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from gpusnap.store import fsutil, parallel  # noqa: E402

CHUNK = 1 << 20
BATCH = 16
LAZY = ("stream", "cache")
_libc = ctypes.CDLL(None, use_errno=True)
MODES = ("each", "auto", "each beside", "auto beside", "stream", "cache")


def _batch(job, b: int) -> None:
    """Batch b: BATCH new 1 MiB chunks, each its own, spread over chunks/xx as a store's.
    Lazy modes (the bound of a design that commits later, apart from the writers):
    "stream" starts each file's writeback and renames it at once, "cache" only writes
    and renames; the caller then syncs the filesystem once."""
    root, tmp, beside, lazy = job
    data = bytearray(os.urandom(CHUNK))
    items = []
    for i in range(BATCH):
        data[:8] = (b << 8 | i).to_bytes(8, "little")
        spread = (b * BATCH + i) * 2654435761 % 256
        items.append((os.path.join(root, f"{spread:02x}", f"{b}-{i}"), bytes(data)))
    if not lazy:
        fsutil.write_renamed_many(items, tmp, fsync=True, beside=beside)
        return
    for path, blob in items:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, blob)
            if lazy == "stream":
                fsutil._start_writeback(fd)
        finally:
            os.close(fd)


def one(where: str, mode: str, mib: int, workers: int, beside: bool = False) -> float:
    """Seconds for W forked writers (store/parallel.py, as a dump's) to store mib MiB
    durably in mode (each, auto; stream and cache: one syncfs at the end)."""
    lazy = mode if mode in LAZY else None
    root, tmp = os.path.join(where, "chunks"), os.path.join(where, "tmp")
    shutil.rmtree(where, ignore_errors=True)
    os.makedirs(tmp)
    os.sync()
    batches = max(1, mib // (BATCH * workers)) * workers
    os.environ[fsutil.FSYNC_ENV] = "auto" if lazy else mode
    t = time.perf_counter()
    _mode, results = parallel.run(_batch, (root, tmp, beside, lazy), batches, workers)
    for _ in results:
        pass
    if lazy:
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.syncfs(fd) if hasattr(os, "syncfs") else _libc.syncfs(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t
    shutil.rmtree(where, ignore_errors=True)
    return seconds


def _where(mode: str) -> str:
    if mode in LAZY:
        return ("writeback started, renamed at once" if mode == "stream" else "written, renamed") + \
            "; one syncfs at the end"
    return "beside their names" if mode.endswith("beside") else "one shared tmp/"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="each,auto,each beside,auto beside",
                    help="comma-separated (_ for a space), of: " + ", ".join(MODES))
    ap.add_argument("--card", default=os.environ.get("GPUSNAP_CARD", "CPU host"))
    ap.add_argument("--out", default=os.environ.get("GPUSNAP_RESULTS") or
                    os.path.join(REPO, "benchmarks", "results"))
    args = ap.parse_args(argv)
    where = os.path.join(args.dir, "gpusnap-fsync-probe")
    modes = tuple(m.strip().replace("_", " ") for m in args.modes.split(","))
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: of {', '.join(MODES)}")
    secs: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for m in modes:
            secs[m].append(one(where, m.split()[0], args.mib, args.workers, m.endswith("beside")))
    gb = (args.mib // (BATCH * args.workers)) * BATCH * args.workers * CHUNK / 1e9
    fs = fsutil.fs_type(args.dir)
    lines = [f"# Durable chunk writes: an fsync a chunk vs one journal commit a batch — {args.card}", "",
             f"`benchmarks/fsync_probe.py {' '.join(argv or sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M')}; "
             f"{args.dir} (statfs f_type {fs:#x}; batch mode: "
             f"{'yes' if fsutil.batch_fsync(os.path.join(args.dir)) else 'no'}), {args.workers} writers, "
             f"{gb:.2f} GB in 1 MiB chunks, {BATCH} a batch; medians of {args.runs}.", "",
             "| GPUSNAP_FSYNC | temp files | s | GB/s |", "|---|---|---|---|",
             *[f"| {m.split()[0]} | {_where(m)} | "
               f"{statistics.median(secs[m]):.2f} | {gb / statistics.median(secs[m]):.2f} |"
               for m in modes], "",
             "Runs (s): " + "; ".join(f"{m} " + ", ".join(f"{x:.2f}" for x in secs[m]) for m in modes)]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    tag = "h200" if "H200" in args.card else args.card.replace(" ", "_").lower()
    path = os.path.join(args.out, f"fsync_probe_{tag}{'_' + str(args.mib) if args.mib != 2048 else ''}.md")
    with open(path, "w") as f:
        f.write(text)
    return path


if __name__ == "__main__":
    main()
