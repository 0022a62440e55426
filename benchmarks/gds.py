"""How fast gpusnap.sdk reads safetensors weights into GPU memory, against this machine's floors.

    python benchmarks/gds.py [--file model.safetensors] [--out DIR]

For one safetensors file (default: the 1b model benchmarks/cold_start.py made, else a
4 GiB file of 64 MiB tensors made here): GB/s into GPU memory through the SDK's loader
(gpusnap/sdk/loader.py), from the page cache (warm) and after drop_caches (cold), with
the pinned reader's threads and window size swept, KvikIO's reader when it is importable,
safetensors' own load_file(device="cuda") for reference, and the floors: pinned
host-to-device copy, and plain parallel reads into host memory (no GPU). Writes
DIR/gds_<card>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpusnap.sdk import loader, read_header  # noqa: E402
from gpusnap.sdk.registry import torch_dtype  # noqa: E402


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def make_file(path: str, gib: int = 4) -> None:
    from tests.workloads.sdk_server import write_safetensors
    import torch
    g = torch.Generator().manual_seed(0)
    n = (gib << 30) // (64 << 20)
    tensors = {f"t{i}": torch.randint(0, 255, (64 << 20,), dtype=torch.uint8, generator=g).view(torch.int64)
               for i in range(n)}
    write_safetensors(tensors, path)


def jobs_for(path: str):
    import torch
    h = read_header(path)
    out = []
    for e in h.entries.values():
        dst = torch.empty(e.shape, dtype=torch_dtype(e.dtype), device="cuda")
        out.append(loader.Job(path, e.offset, e.length, dst))
    return out


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


USED: dict = {}


def run_loader(jobs, reader, threads, chunk, cold: bool) -> float:
    import torch
    if cold:
        drop_caches()
    torch.cuda.synchronize()
    t = time.perf_counter()
    stats = loader.load(jobs, reader=reader, threads=threads, chunk=chunk)
    torch.cuda.synchronize()
    USED[reader] = stats["reader"]          # what really ran (kvikio falls back to pinned)
    return gbps(stats["bytes"], time.perf_counter() - t)


def host_read(path: str, threads: int, chunk: int, cold: bool) -> float:
    """Parallel pread into one host buffer (no GPU): what the disk / page cache gives."""
    from concurrent.futures import ThreadPoolExecutor
    size = os.path.getsize(path)
    buf = ctypes.create_string_buffer(chunk * threads)
    if cold:
        drop_caches()
    fd = os.open(path, os.O_RDONLY)
    offs = list(range(0, size, chunk))
    t = time.perf_counter()

    def one(i):
        view = memoryview(buf)[(i % threads) * chunk:(i % threads + 1) * chunk]
        os.preadv(fd, [view], offs[i])

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, range(len(offs))))
    os.close(fd)
    return gbps(size, time.perf_counter() - t)


def pinned_h2d(gib: int = 2) -> float:
    from benchmarks.cold_start import floor_pinned_h2d
    return floor_pinned_h2d(gib)


def check_correct(path: str, jobs) -> bool:
    """Every tensor read by the loader equals the file's bytes (sampled ends)."""
    from gpusnap.sdk.registry import host_bytes, byte_view
    with open(path, "rb", buffering=0) as f:
        for j in jobs:
            n = min(j.length, 1 << 16)
            b = byte_view(j.dst)
            if host_bytes(b[:n]) != os.pread(f.fileno(), n, j.offset):
                return False
            if host_bytes(b[j.length - n:]) != os.pread(f.fileno(), n, j.offset + j.length - n):
                return False
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default="/tmp/gpusnap-bench/models/1b/model.safetensors")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    ap.add_argument("--oneshot", help="internal: one load with this reader, print GB/s")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=4)
    args = ap.parse_args()
    import torch
    if args.oneshot:
        jobs = jobs_for(args.file)
        torch.cuda.synchronize()
        t = time.perf_counter()
        stats = loader.load(jobs, reader=args.oneshot, threads=args.threads, chunk=args.chunk << 20)
        torch.cuda.synchronize()
        print(json.dumps({"reader": stats["reader"], "gbps": gbps(stats["bytes"], time.perf_counter() - t)}))
        return
    card = torch.cuda.get_device_name(0)
    path = args.file
    if not os.path.exists(path):
        path = "/tmp/gpusnap-gds-bench.safetensors"
        if not os.path.exists(path):
            make_file(path)
    size = os.path.getsize(path)
    res = {"card": card, "file": path, "bytes": size, "cpus": os.cpu_count(),
           "backend": loader.gds_backend(), "nvidia_fs": os.path.exists("/proc/driver/nvidia-fs"),
           "can_drop_caches": drop_caches(), "warm": [], "cold": []}
    print(json.dumps({k: res[k] for k in ("card", "file", "bytes", "cpus", "backend", "nvidia_fs")}), flush=True)
    res["pinned_h2d_gbs"] = pinned_h2d()
    jobs = jobs_for(path)
    warm(path)
    run_loader(jobs, "pinned", 8, 16 << 20, cold=False)           # first touch of the buffers
    res["correct"] = check_correct(path, jobs)
    threads_set = [4, 8, 16] if args.quick else [1, 2, 4, 8, 16, 32]
    chunks = [2, 4, 16] if args.quick else [1, 2, 4, 16, 64]
    have_kvikio = loader.gds_backend()["reader"].startswith("kvikio")
    configs = [("pinned", t, c, pin) for pin in ("register", "torch") for t in threads_set for c in chunks]
    if have_kvikio:
        configs += [("kvikio", t, c, None) for t in (8, 16) for c in (4, 16)]
    for reader, t, c, pin in configs:
        if pin:
            os.environ["GPUSNAP_SDK_PIN"] = pin
        warm(path)
        xs = [run_loader(jobs, reader, t, c << 20, cold=False) for _ in range(args.reps)]
        row = {"reader": USED.get(reader, reader) + (f" ({pin})" if pin else ""), "threads": t,
               "chunk_mib": c, "gbps": statistics.median(xs)}
        res["warm"].append(row)
        print(json.dumps({"warm": row}), flush=True)
    os.environ.pop("GPUSNAP_SDK_PIN", None)
    # one load in a fresh process (CUDA up, destinations allocated): what a resume costs,
    # the reader's own start-up (KvikIO's cuFile driver, its bounce buffers) included
    res["oneshot"] = []
    shots = [("pinned", 8, 4, "register"), ("pinned", 8, 4, "torch"), ("pinned", 16, 2, "register")]
    if have_kvikio:
        shots.append(("kvikio", 16, 16, None))
    for reader, t, c, pin in shots:
        warm(path)
        env = {**os.environ, **({"GPUSNAP_SDK_PIN": pin} if pin else {})}
        out = subprocess.run([sys.executable, __file__, "--file", path, "--oneshot", reader,
                              "--threads", str(t), "--chunk", str(c)], env=env,
                             capture_output=True, text=True, timeout=120)
        try:
            got = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            got = {"error": out.stderr[-500:]}
        row = {"reader": f"{got.get('reader', reader)}" + (f" ({pin})" if pin else ""), "threads": t,
               "chunk_mib": c, "gbps": got.get("gbps", 0.0)}
        res["oneshot"].append(row)
        print(json.dumps({"oneshot": row, **({"error": got["error"]} if "error" in got else {})}), flush=True)
    for t, c in [(16, 64)]:
        warm(path)
        row = {"reader": "host-only pread", "threads": t, "chunk_mib": c,
               "gbps": statistics.median([host_read(path, t, c << 20, False) for _ in range(args.reps)])}
        res["warm"].append(row)
    try:
        from safetensors.torch import load_file
        warm(path)
        t0 = time.perf_counter()
        load_file(path, device="cuda")
        torch.cuda.synchronize()
        res["warm"].append({"reader": "safetensors.load_file(device='cuda')", "threads": 1, "chunk_mib": None,
                            "gbps": gbps(size, time.perf_counter() - t0)})
    except ImportError:
        pass
    if res["can_drop_caches"]:
        best = sorted((r for r in res["warm"] if r["reader"].startswith("pinned")), key=lambda r: -r["gbps"])[:2]
        cold = {(b["threads"], b["chunk_mib"]) for b in best} | {(16, 16)}
        for t, c in sorted(cold):
            row = {"reader": "pinned", "threads": t, "chunk_mib": c,
                   "gbps": run_loader(jobs, "pinned", t, c << 20, cold=True)}
            res["cold"].append(row)
            print(json.dumps({"cold": row}), flush=True)
        if have_kvikio:
            for t, c in [(16, 16)]:
                g = run_loader(jobs, "kvikio", t, c << 20, cold=True)
                row = {"reader": USED.get("kvikio", "kvikio"), "threads": t, "chunk_mib": c, "gbps": g}
                res["cold"].append(row)
                print(json.dumps({"cold": row}), flush=True)
        for t, c in [(16, 64)]:
            res["cold"].append({"reader": "host-only pread", "threads": t, "chunk_mib": c,
                                "gbps": host_read(path, t, c << 20, True)})
        try:
            from safetensors.torch import load_file
            drop_caches()
            t0 = time.perf_counter()
            load_file(path, device="cuda")
            torch.cuda.synchronize()
            res["cold"].append({"reader": "safetensors.load_file(device='cuda')", "threads": 1,
                                "chunk_mib": None, "gbps": gbps(size, time.perf_counter() - t0)})
        except ImportError:
            pass
    md = summarise(res)
    print(md, flush=True)
    tag = "h200" if "H200" in card else "h100" if "H100" in card else card.replace(" ", "_").lower()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"gds_{tag}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, f"gds_{tag}.md"), "w") as f:
        f.write(md)


def summarise(res) -> str:
    lines = [f"# Weights into GPU memory — {res['card']}", "",
             f"File: {res['file']} ({res['bytes']/1e9:.2f} GB), {res['cpus']} CPUs. "
             f"SDK reader by default here: **{res['backend']['reader']}** ({res['backend']['reason']}). "
             f"nvidia-fs loaded: {res['nvidia_fs']}. Every tensor read back equals the file: {res['correct']}.",
             "", f"Floor: pinned host-to-device copy {res['pinned_h2d_gbs']:.1f} GB/s.", ""]
    for kind in ("warm", "oneshot", "cold"):
        rows = res.get(kind)
        if not rows:
            continue
        what = {"warm": "page cache, the loader called again and again in one process",
                "oneshot": "page cache, one load in a fresh process: what a resume pays",
                "cold": "after drop_caches"}[kind]
        lines += [f"## {kind} ({what})", "",
                  "| reader | threads | window MiB | GB/s |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['reader']} | {r['threads']} | {r['chunk_mib'] or '-'} | {r['gbps']:.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
