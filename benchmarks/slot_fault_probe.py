"""What fresh memory costs the page stream's copy threads (store/pagestream.py).

A first dump's stream grows to hundreds of 16 MiB slots of shared anonymous memory (shmem):
each slot's first use faults in 4 KiB pages (a host's shmem THP is usually `never`), while
CRIU waits on the copy. This times the copy into slots as the copy threads do it (ctypes
memmove, GIL let go; THREADS threads, each its share of the slots) into:

    shm_fresh      shared anonymous memory, untouched (the stream's slots today)
    shm_again      the same slots once more (touched: a reused slot)
    shm_thp        shared anonymous memory with MADV_HUGEPAGE (huge only where the host's
                   shmem_enabled is `advise` or `always`: its mode is printed)
    private_thp    private anonymous memory with MADV_HUGEPAGE (what worker processes
                   could read with process_vm_readv instead of sharing the slots)
    private_4k     private anonymous memory with MADV_NOHUGEPAGE

and the munmap of each mapping (a grown stream gives its slots back at the end).

    python benchmarks/slot_fault_probe.py --gib 8 --threads 4 [--out DIR] [--card NAME]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import threading
import time

SLOT = 16 << 20
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
_libc = ctypes.CDLL(None, use_errno=True)


def _mode(name: str) -> str:
    try:
        with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
            text = f.read()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return "?"


def _copy_into(mm: mmap.mmap, size: int, threads: int, src) -> float:
    """Seconds to fill every slot of mm from src (THREADS threads, slots round robin)."""
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    srcp = ctypes.addressof(src)
    slots = size // SLOT

    def run(i: int) -> None:
        for s in range(i, slots, threads):
            ctypes.memmove(base + s * SLOT, srcp, SLOT)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    t = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return time.perf_counter() - t


def _mapping(kind: str, size: int) -> mmap.mmap:
    flags = mmap.MAP_SHARED if kind.startswith("shm") else mmap.MAP_PRIVATE
    mm = mmap.mmap(-1, size, flags=flags | mmap.MAP_ANONYMOUS)
    advice = {"shm_thp": MADV_HUGEPAGE, "private_thp": MADV_HUGEPAGE,
              "private_4k": MADV_NOHUGEPAGE}.get(kind)
    if advice is not None:
        mm.madvise(advice)
    return mm


def _one(kind: str, size: int, threads: int, src) -> dict:
    mm = _mapping(kind, size)
    out = {"fresh_s": _copy_into(mm, size, threads, src)}
    if kind == "shm_fresh":
        out["again_s"] = _copy_into(mm, size, threads, src)
    t = time.perf_counter()
    mm.close()
    out["unmap_s"] = time.perf_counter() - t
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=8)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--card", default="CPU host")
    args = ap.parse_args(argv)
    size = int(args.gib * (1 << 30)) // SLOT * SLOT
    src = (ctypes.c_char * SLOT).from_buffer(bytearray(os.urandom(1 << 20) * 16))
    kinds = ("shm_fresh", "shm_thp", "private_thp", "private_4k")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.runs):
        for kind in kinds:
            runs[kind].append(_one(kind, size, args.threads, src))
            print(kind, {k: round(v, 3) for k, v in runs[kind][-1].items()}, flush=True)
    gb = size / 1e9
    med = statistics.median
    rows = []
    for kind in kinds:
        fresh = med([r["fresh_s"] for r in runs[kind]])
        rows.append(f"| {kind} | {fresh:.2f} | {gb / fresh:.1f} | {med([r['unmap_s'] for r in runs[kind]]):.2f} |")
        if kind == "shm_fresh":
            again = med([r["again_s"] for r in runs[kind]])
            rows.append(f"| shm_again (the same slots, touched) | {again:.2f} | {gb / again:.1f} | - |")
    text = "\n".join([
        f"# Copying into the page stream's slots: fresh memory against touched — {args.card}", "",
        f"`benchmarks/slot_fault_probe.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
        f"{time.strftime('%Y-%m-%d %H:%M')}; {gb:.2f} GB in 16 MiB slots, {args.threads} threads, "
        f"medians of {args.runs}; THP enabled `{_mode('enabled')}`, shmem_enabled "
        f"`{_mode('shmem_enabled')}`, defrag `{_mode('defrag')}`.", "",
        "| memory | copy s | GB/s | munmap s |", "|---|---|---|---|", *rows, ""])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"slot_fault_probe_{args.card.replace(' ', '_').lower()}.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    return path


if __name__ == "__main__":
    main()
