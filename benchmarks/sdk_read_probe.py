"""Where an SDK server's resume spends its weight read: fresh process against parked and resumed.

    python benchmarks/sdk_read_probe.py [--gib 16] [--runs 2] [--out DIR]

The switch row (breadth_switch_h200_8b_s17.md) read an 8B server's 16 GB back at ~26 GB/s
inside a resumed server; benchmarks/gds.py read the same size at ~35 GB/s in a fresh process.
This probe takes one process through both: it makes a safetensors file of 8B-like tensors
(32 and 112 MiB, bf16), reads it into GPU tensors with gpusnap.sdk.loader (`fresh`), then,
per row, drops the tensors as the SDK agent's prepare does, parks itself with `gpusnap
suspend PID` (lock + checkpoint; the process stays alive), `gpusnap resume PID`, allocates
the tensors again and reads them with the row's reader:

  parked        the loader as a resume runs it (pinned, its defaults)
  parked_t16    16 threads
  parked_c32    32 MiB windows
  mapped        the loader's mapped reader (GPUSNAP_SDK_READER=mapped): no host copy, the
                file mmap'd read-only, each 256 MiB window cudaHostRegister'ed with
                cudaHostRegisterReadOnly (the page cache's own pages pinned) and copied
                to the GPU by DMA, then unregistered: needs the device attribute
                READ_ONLY_HOST_REGISTER_SUPPORTED (printed); mapped_t16: 16 threads,
                mapped_w64: 64 MiB windows
  held          the file registered read-only whole before the park (benchmarks/held_files.py,
                hold_s) and held through it; the tensors copied from it after the
                resume, then given back (release_s): does the registration survive the
                driver's checkpoint and restore, and at what speed does it copy then
  hostcopy      a copy of the tensors in pinned host memory (huge pages, registered:
                loader._PinnedPool; alloc_s, d2h_s) held through the park, copied back
                after the resume: what the driver's checkpoint and restore cost with a
                pinned host copy the weights' size in the process; hostcopy_torch: the
                copy in torch's pinned memory (cudaHostAlloc) instead

Floors in the same run: parallel pread from the page cache into host memory (8 and 16
threads), pinned host-to-device. Every read is checked against the file (ends of each
tensor). Prints a table; writes DIR/sdk_read_probe_<card>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.gds import check_correct, host_read, jobs_for, pinned_h2d, warm  # noqa: E402
from benchmarks.seed_probe import bf16_header  # noqa: E402
from gpusnap.sdk import loader  # noqa: E402
from gpusnap.sdk.registry import byte_view  # noqa: E402

SIZES = (32 << 20, 112 << 20, 112 << 20, 112 << 20, 32 << 20, 32 << 20, 32 << 20)


def make_file(path: str, gib: int) -> int:
    """bf16 tensors of SIZES' bytes, random, written one at a time (header first)."""
    import torch
    total, sizes = gib << 30, []
    while sum(sizes) < total:
        sizes.append(SIZES[len(sizes) % len(SIZES)])
    head, off = bf16_header(sizes)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(head)
        g = torch.Generator(device="cuda").manual_seed(0)
        for n in sizes:
            t = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda", generator=g).cpu()
            f.write(memoryview(t.numpy()))
    os.rename(path + ".tmp", path)
    return off


def gpusnap(*args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "gpusnap", *args, "--json"], capture_output=True,
                       text=True, timeout=120)
    if p.returncode:
        raise RuntimeError(f"gpusnap {' '.join(args)}: rc {p.returncode}: {p.stdout} {p.stderr}")
    return json.loads(p.stdout)


def drop(jobs) -> None:
    import torch
    for j in jobs:
        j.dst.data = torch.empty(0, dtype=j.dst.dtype, device=j.dst.device)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def alloc(jobs) -> float:
    import torch
    t = time.perf_counter()
    for j in jobs:
        j.dst.data = torch.empty(j.length // j.dst.element_size(), dtype=j.dst.dtype, device="cuda")
    return time.perf_counter() - t


def park() -> dict:
    """The worker asks its parent to park it (gpusnap refuses to suspend an ancestor of
    its own, so the worker runs in its own session) and waits, out of CUDA, for the
    answer."""
    print("PARK", flush=True)
    result = json.loads(sys.stdin.readline())
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def parent(argv: list[str]) -> int:
    """Run the probe as a worker in its own session; suspend and resume it when it asks."""
    w = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", *argv],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    for line in w.stdout:
        if line.strip() != "PARK":
            print(line, end="", flush=True)
            continue
        result: dict = {}
        try:
            t = time.perf_counter()
            result["suspend"] = gpusnap("suspend", str(w.pid))
            result["suspend_s"] = time.perf_counter() - t
            t = time.perf_counter()
            result["resume"] = gpusnap("resume", str(w.pid))
            result["resume_s"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - the worker records it in its row
            result = {"error": f"{type(e).__name__}: {e}"}
            subprocess.run([sys.executable, "-m", "gpusnap", "resume", str(w.pid)], capture_output=True)
        w.stdin.write(json.dumps(result) + "\n")
        w.stdin.flush()
    return w.wait()


VARIANTS = {"parked": {}, "parked_t16": {"threads": 16}, "parked_c32": {"chunk": 32 << 20},
            "mapped": {"reader": "mapped"}, "mapped_t16": {"reader": "mapped", "threads": 16},
            "mapped_w64": {"reader": "mapped", "chunk": 64 << 20},
            "parked_t4": {"threads": 4}, "parked_t32": {"threads": 32},
            "parked_c4": {"chunk": 4 << 20}, "parked_t16_c4": {"threads": 16, "chunk": 4 << 20},
            "parked_c16": {"chunk": 16 << 20}, "parked_t16_c16": {"threads": 16, "chunk": 16 << 20},
            "parked_t16_c8": {"threads": 16, "chunk": 8 << 20}}
HALVES = ("pread_only", "dma_only", "both_halves", "pread_only_torch", "both_halves_torch",
          "pread_only_plain")


class _Plain:
    """An ordinary (not pinned) host buffer shaped as a pool: pread_only_plain."""

    def __init__(self, nbytes: int):
        import torch
        self.tensor = torch.ones(nbytes, dtype=torch.uint8)     # written: faulted in

    def close(self) -> None:
        self.tensor = None


def halves(jobs, what: str, threads: int = 16, window: int = 16 << 20) -> dict:
    """The pinned reader's two halves apart (16 threads, 16 MiB windows, as the reader from 8 GiB up): pread_only
    reads every window into the pool and copies nothing; dma_only copies the pool's
    buffers to every window's tensors and reads nothing (the bytes are wrong: timing
    only); both_halves does both, as the reader does. Where both_halves takes about the
    sum of the other two, a thread's read and its copy do not overlap. A name ending in
    _torch takes the pool from torch's pinned allocator (GPUSNAP_SDK_PIN=torch) instead
    of registered huge pages; pread_only_plain reads into ordinary memory."""
    import queue
    import threading

    import torch
    wins = loader.windows(jobs, window)
    workers = min(threads, len(wins))
    if what.endswith("_plain"):
        pool = _Plain(workers * 2 * window)
    else:
        pool = loader._PinnedPool(workers * 2 * window, "torch" if what.endswith("_torch") else None)
    what = what.rsplit("_", 1)[0] if what.endswith(("_torch", "_plain")) else what
    q: queue.SimpleQueue = queue.SimpleQueue()
    for w in wins:
        q.put(w)
    fd = os.open(jobs[0].path, os.O_RDONLY)

    def work(i):
        bufs = [pool.tensor[(2 * i + j) * window:(2 * i + j + 1) * window] for j in range(2)]
        raw = [loader._address_buffer(b.data_ptr(), window) for b in bufs]
        stream = torch.cuda.Stream()
        events, k = [None, None], 0
        while True:
            try:
                w = q.get_nowait()
            except queue.Empty:
                break
            if events[k] is not None:
                events[k].synchronize()
            if what != "dma_only":
                loader._pread_into(fd, memoryview(raw[k])[:w.length], w.offset)
            if what != "pread_only":
                with torch.cuda.stream(stream):
                    for dst, doff, boff, n in w.pieces:
                        dst[doff:doff + n].copy_(bufs[k][boff:boff + n], non_blocking=True)
                    events[k] = torch.cuda.Event()
                    events[k].record(stream)
            k ^= 1
        for ev in events:
            if ev is not None:
                ev.synchronize()
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        ts = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - t, "bytes": sum(j.length for j in jobs)}
    finally:
        os.close(fd)
        pool.close()


def slices(jobs, block) -> list:
    """block cut into one slice per job, each its tensor's length, in the jobs' order."""
    out, at = [], 0
    for j in jobs:
        out.append(block[at:at + j.length])
        at += j.length
    return out


class HostCopy:
    """The hostcopy row's pinned copy of every job's tensor, made before the park."""

    def __init__(self, jobs, mode=None):
        import torch
        t = time.perf_counter()
        self.pool = loader._PinnedPool(sum(j.length for j in jobs), mode)
        self.alloc_s = time.perf_counter() - t
        self.host = slices(jobs, self.pool.tensor)
        t = time.perf_counter()
        for h, j in zip(self.host, jobs):
            h.copy_(byte_view(j.dst), non_blocking=True)
        torch.cuda.synchronize()
        self.d2h_s = time.perf_counter() - t

    def load(self, jobs) -> dict:
        for h, j in zip(self.host, jobs):
            byte_view(j.dst).copy_(h, non_blocking=True)
        return {"reader": "hostcopy"}

    def release(self) -> float:
        t = time.perf_counter()
        self.host = []
        self.pool.close()
        return time.perf_counter() - t


def read(jobs, how: str, held=None) -> dict:
    import torch
    torch.cuda.synchronize()
    t = time.perf_counter()
    if held is not None:
        extra = held.load(jobs)
    else:
        extra = halves(jobs, how) if how in HALVES else loader.load(jobs, **VARIANTS[how])
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    n = sum(j.length for j in jobs)
    return {"seconds": round(s, 4), "gbps": round(n / s / 1e9, 2),
            **{k: v for k, v in extra.items() if k in ("reader", "threads", "chunk")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rows", default="parked,parked_t16,parked_c32,mapped,mapped_t16,mapped_w64")
    ap.add_argument("--file", default="/tmp/gpusnap-bench/sdkprobe/model.safetensors")
    ap.add_argument("--out", default=os.environ.get("GPUSNAP_RESULTS", os.path.join(REPO, "benchmarks", "results")))
    ap.add_argument("--halves", default="", help="rows of the pinned reader's halves apart, "
                    "fresh: a comma list of " + ", ".join(HALVES))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not a.worker:
        return parent(sys.argv[1:])
    import torch
    torch.cuda.init()
    card = torch.cuda.get_device_name(0)
    if not os.path.exists(a.file) or os.path.getsize(a.file) < (a.gib << 30):
        t = time.perf_counter()
        make_file(a.file, a.gib)
        print(f"made {a.file} in {time.perf_counter() - t:.1f} s", flush=True)
    warm(a.file)
    jobs = jobs_for(a.file)
    supported = loader.read_only_register_supported()
    res = {"card": card, "gib": a.gib, "bytes": sum(j.length for j in jobs), "tensors": len(jobs),
           "read_only_register_supported": supported,
           "floors": {"host_read_8": round(host_read(a.file, 8, 16 << 20, False), 2),
                      "host_read_16": round(host_read(a.file, 16, 16 << 20, False), 2),
                      "pinned_h2d": round(pinned_h2d(), 2)},
           "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)

    def row(name, how, parked):
        r = {"row": name}
        held = None
        try:
            if how == "held":
                from benchmarks.held_files import HeldFiles
                held = HeldFiles()
                r["hold_s"] = held.hold([a.file])["seconds"]
            if how.startswith("hostcopy"):
                held = HostCopy(jobs, "torch" if how.endswith("_torch") else None)
                r.update(alloc_s=round(held.alloc_s, 3), d2h_s=round(held.d2h_s, 4))
            if parked:
                drop(jobs)
                p = park()
                r.update(suspend_s=round(p["suspend_s"], 3), resume_s=round(p["resume_s"], 3))
                r["alloc_s"] = round(alloc(jobs), 4)
            r.update(read(jobs, how, held))
            r["correct"] = check_correct(a.file, jobs) if how not in HALVES else None
        except Exception as e:  # noqa: BLE001 - a probe row that fails says why and the next runs
            r["error"] = f"{type(e).__name__}: {e}"
        finally:
            if held is not None:
                r["release_s"] = round(held.release(), 4)
        print(json.dumps(r), flush=True)
        res["rows"].append(r)

    for _ in range(a.runs):
        row("fresh", "parked", False)
        if supported:
            row("fresh_mapped", "mapped", False)
    for _ in range(a.runs):
        for name in a.rows.split(","):
            if name.startswith(("mapped", "held")) and not supported:
                continue
            row(name, name, True)
        for name in a.halves.split(","):
            if name:
                row(name, name, False)
    os.makedirs(a.out, exist_ok=True)
    slug = "h200" if "H200" in card else card.split()[-1].lower()
    with open(os.path.join(a.out, f"sdk_read_probe_{slug}.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# SDK weight read, fresh vs parked — {card}", "",
             f"{res['bytes'] / 1e9:.2f} GB in {res['tensors']} tensors, page cache warm. Floors: "
             f"pread 8 threads {res['floors']['host_read_8']} GB/s, 16 threads {res['floors']['host_read_16']}, "
             f"pinned H2D {res['floors']['pinned_h2d']}. cudaHostRegisterReadOnly supported: "
             f"{res['read_only_register_supported']}.", "",
             "| row | runs | GB/s (median) | seconds | correct |", "|---|---|---|---|---|"]
    by: dict = {}
    for r in res["rows"]:
        by.setdefault(r["row"], []).append(r)
    for name, rs in by.items():
        ok = [r for r in rs if "gbps" in r]
        med = f"{statistics.median(r['gbps'] for r in ok):.2f}" if ok else "-"
        secs = " / ".join(f"{r['seconds']:.3f}" for r in ok) or rs[0].get("error", "")
        ok_all = "-" if name in HALVES else all(r.get("correct") for r in rs)
        lines.append(f"| {name} | {len(rs)} | {med} | {secs} | {ok_all} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, f"sdk_read_probe_{slug}.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
