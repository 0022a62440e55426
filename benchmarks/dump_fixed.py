"""What a dump costs besides CRIU's page walk: `gpusnap dump` beside a naive `criu dump`
into /dev/shm, stage by stage, on this (CPU) host.

    python benchmarks/dump_fixed.py [--mib 1024] [--regions 8000] [--runs 5] [--code DIR ...]
                                    [--store-dir /var/tmp] [--out benchmarks/results] [--tag cpu]

The tree: one process holding --mib MiB of random data in --regions anonymous mappings
(a guard page after each, so none merge): many pagemap entries and many small chunks, as
an LLM server's CUDA host copy gives (the 1.3B server: ~15,000 chunks). Every run starts
a fresh tree (a new seed: its chunks are new to the store) for each row:

- naive: `criu dump` into a directory on /dev/shm (nothing stored, nothing hashed)
- gpusnap: `gpusnap dump --json` into one store on --store-dir (a disk: durable), which
  an untimed first dump created; its `timings` give the stages, and `outside` is the
  wall clock no stage covers (interpreter start, imports, the intent record, the store's
  lock, killing the dumped tree, exit). --code DIR ...: the gpusnap of each checkout
  (default: this one), each into a store of its own, taking turns within every run (a
  before/after on the same host at the same time)

Medians of --runs. Writes OUT/dump_fixed_TAG.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpusnap.criu.locate import find_criu  # noqa: E402

PAGE = 4096


def hold(state: str, mib: int, regions: int, seed: int) -> None:
    """In the held process: the regions, then ready, then sleep until killed."""
    import ctypes
    import random
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    rng = random.Random(seed)
    size = max(PAGE, (mib << 20) // regions // PAGE * PAGE)
    held = []
    for _ in range(regions):
        addr = libc.mmap(None, size + PAGE, 3, 0x22, -1, 0)    # RW, PRIVATE|ANONYMOUS
        libc.mprotect(ctypes.c_void_p(addr + size), PAGE, 0)     # the guard: no merging
        ctypes.memmove(addr, rng.randbytes(size), size)
        held.append(addr)
    with open(os.path.join(state, "ready.tmp"), "w") as f:
        json.dump({"pid": os.getpid()}, f)
    os.rename(os.path.join(state, "ready.tmp"), os.path.join(state, "ready"))
    while True:
        signal.pause()


def start(state: str, mib: int, regions: int, seed: int) -> subprocess.Popen:
    os.makedirs(state)
    log = open(os.path.join(state, "log"), "wb")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hold", state, "--mib",
                      str(mib), "--regions", str(regions), "--seed", str(seed)], cwd=REPO,
                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    ready = os.path.join(state, "ready")
    for _ in range(2400):
        if os.path.exists(ready):
            return proc
        time.sleep(0.05)
    raise TimeoutError("the holder did not start")


def gone(proc: subprocess.Popen) -> None:
    """The holder killed (a dump killed it already) and reaped."""
    proc.kill()
    proc.wait()


def naive(criu: str, pid: int, images: str) -> float:
    os.makedirs(images)
    t = time.perf_counter()
    subprocess.run([criu, "dump", "-t", str(pid), "-D", images, "--shell-job",
                    "--tcp-established", "--file-locks", "--ext-unix-sk", "-o", "d.log"],
                   check=True, capture_output=True)
    took = time.perf_counter() - t
    shutil.rmtree(images)
    return took


def gpusnap_dump(code: str, store: str, pid: int) -> tuple[float, dict, int]:
    env = {**os.environ, "GPUSNAP_SOCKET": "", "PYTHONPATH": code}
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "gpusnap", "--json", "--store", store, "dump",
                          "--pid", str(pid)], cwd=code, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if res.returncode:
        raise RuntimeError(f"gpusnap dump: {res.returncode} {res.stderr[-2000:]}")
    out = json.loads(res.stdout)
    return took, out["timings"], out["bytes_logical"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hold")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--regions", type=int, default=8000)
    ap.add_argument("--code", nargs="+", default=[REPO])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--store-dir", default="/var/tmp")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    if args.hold:
        return hold(args.hold, args.mib, args.regions, args.seed)
    criu = find_criu()[0]
    codes = [os.path.abspath(c) for c in args.code]
    work = tempfile.mkdtemp(prefix="gpusnap-fixed-", dir="/dev/shm")
    stores = []
    for _ in codes:
        stores.append(tempfile.mkdtemp(prefix="gpusnap-fixed-store-", dir=args.store_dir))
        os.rmdir(stores[-1])                    # gpusnap creates it
    naive_s: list[float] = []
    rows: list[list[dict]] = [[] for _ in codes]
    try:
        for run in range(args.runs + 1):
            seed = 100 * run
            proc = start(os.path.join(work, f"n{run}"), args.mib, args.regions, seed)
            took = naive(criu, proc.pid, os.path.join(work, f"img{run}"))
            gone(proc)
            for k, (code, store) in enumerate(zip(codes, stores)):
                proc = start(os.path.join(work, f"g{run}-{k}"), args.mib, args.regions, seed + k + 1)
                wall, timings, logical = gpusnap_dump(code, store, proc.pid)
                gone(proc)
                stages = {n: v for n, v in timings.items() if not n.startswith("stream_")}
                row = {"wall": wall, "bytes": logical, "stages": stages,
                       "outside": wall - sum(stages.values())}
                if run:                         # the first created the store
                    rows[k].append(row)
                    print(run, code, round(wall, 3), {n: round(v, 3) for n, v in stages.items()},
                          f"outside {row['outside']:.3f}", flush=True)
            if run:
                naive_s.append(took)
                print(run, "naive", round(took, 3), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for store in stores:
            shutil.rmtree(store, ignore_errors=True)
    med = [{"wall": statistics.median(r["wall"] for r in rs),
            "outside": statistics.median(r["outside"] for r in rs),
            "stages": {n: statistics.median(r["stages"].get(n, 0.0) for r in rs)
                       for n in rs[-1]["stages"]}} for rs in rows]
    names = [os.path.relpath(c, os.path.dirname(REPO)) if c != REPO else "this checkout"
             for c in codes]
    host = f"{platform.node()} ({os.cpu_count()} cores)"
    stage_names = list(dict.fromkeys(n for m in med for n in m["stages"]))
    lines = [f"# A dump's fixed costs: gpusnap beside a naive criu dump — {host}", "",
             f"One process, {args.mib} MiB of random data in {args.regions} regions, a fresh "
             f"tree each dump, stores on {args.store_dir}; medians of {args.runs} (s). "
             "`python benchmarks/dump_fixed.py`.", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             f"| naive `criu dump` (tmpfs) | {statistics.median(naive_s):.3f} |"
             + " |" * (len(names) - 1),
             "| `gpusnap dump` wall | " + " | ".join(f"{m['wall']:.3f}" for m in med) + " |",
             *["| stage " + n + " | " + " | ".join(f"{m['stages'].get(n, 0.0):.3f}" for m in med)
               + " |" for n in stage_names],
             "| outside any stage | " + " | ".join(f"{m['outside']:.3f}" for m in med) + " |"]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"dump_fixed_{args.tag}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"dump_fixed_{args.tag}.json"), "w") as f:
        json.dump({"host": host, "mib": args.mib, "regions": args.regions, "codes": names,
                   "naive": naive_s, "rows": rows, "median": med}, f, indent=1)


if __name__ == "__main__":
    main()
