"""What parking an SDK server's weights in host memory would cost, against reading them back.

    python benchmarks/host_park_probe.py [--gib 16] [--runs 2] [--out DIR]

An SDK server's resume reads its weights from the page cache at ~30 GB/s
(sdk_read_probe_h200_s18*.md), the page cache into the pinned pool being the bound. A
server that keeps its weights in pinned host memory while parked (as vLLM's sleep level
1 does) would copy host-to-device only. This probe, in one fresh process with the 8B-like
tensors of sdk_read_probe.py (16 GiB on the GPU, the file warm), times each piece such a
park would cost:

  alloc_registered   a block the weights' size: anonymous memory, huge pages asked for,
                     cudaHostRegister'ed (loader._PinnedPool, as the reader's pool); and
                     free_registered, giving it back
  alloc_torch        the same from torch's pinned allocator (cudaHostAlloc)
  d2h_sN / h2d_sN    every tensor to its slice of the block and back, on N streams (tensors
                     dealt round-robin); h2d rows are checked (registry.fingerprints)
  duplex             half the tensors to the host while the other half come back, one
                     stream each way (what a switch overlapping OUT's park with IN's resume
                     asks of the link)
  held_register      the weights file mmap'd and cudaHostRegister'ed read-only whole, once
                     (the page cache's own pages pinned while parked: no second host copy);
                     held_h2d_sN copies from it; held_unregister

Floors in the same run: the SDK's pinned reader (loader.load) from the page cache, pinned
host-to-device. Prints a table; writes DIR/host_park_probe_<card>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.gds import jobs_for, pinned_h2d, warm  # noqa: E402
from benchmarks.sdk_read_probe import make_file, slices  # noqa: E402
from gpusnap.sdk import loader, registry  # noqa: E402


def _sync():
    import torch
    torch.cuda.synchronize()


def timed(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def copy(pairs, streams: int) -> None:
    """dst.copy_(src) for each (dst, src), dealt round-robin over `streams` streams."""
    import torch
    ss = [torch.cuda.Stream() for _ in range(streams)]
    for i, (dst, src) in enumerate(pairs):
        with torch.cuda.stream(ss[i % streams]):
            dst.copy_(src, non_blocking=True)
    for s in ss:
        s.synchronize()


def register_read_only(ptr: int, n: int) -> None:
    import torch
    err = torch.cuda.cudart().cudaHostRegister(ptr, n, loader.READ_ONLY)
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"cudaHostRegister read-only: {err}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--file", default="/tmp/gpusnap-bench/sdkprobe/model.safetensors")
    ap.add_argument("--out", default=os.environ.get("GPUSNAP_RESULTS", os.path.join(REPO, "benchmarks", "results")))
    a = ap.parse_args()
    import torch
    torch.cuda.init()
    card = torch.cuda.get_device_name(0)
    if not os.path.exists(a.file) or os.path.getsize(a.file) < (a.gib << 30):
        make_file(a.file, a.gib)
    warm(a.file)
    jobs = jobs_for(a.file)
    gpu = [registry.byte_view(j.dst) for j in jobs]
    total = sum(j.length for j in jobs)
    res = {"card": card, "gib": a.gib, "bytes": total, "tensors": len(jobs),
           "floors": {"pinned_h2d": round(pinned_h2d(), 2)}, "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)

    def row(name, seconds, nbytes=None, **kw):
        r = {"row": name, "seconds": round(seconds, 4), **kw}
        if nbytes:
            r["gbps"] = round(nbytes / seconds / 1e9, 2)
        print(json.dumps(r), flush=True)
        res["rows"].append(r)

    for _ in range(a.runs):
        s, stats = timed(lambda: loader.load(jobs))
        row("reader", s, total, reader=stats["reader"], threads=stats["threads"])
        want = registry.fingerprints([j.dst for j in jobs])

        s, pool = timed(lambda: loader._PinnedPool(total))
        row("alloc_registered", s, mode=pool.mode)
        host = slices(jobs, pool.tensor)
        for n in (1, 4):
            s, _ = timed(lambda: copy(list(zip(host, gpu)), n))
            row(f"d2h_s{n}", s, total)
        for n in (1, 4):
            for g in gpu:
                g.zero_()
            s, _ = timed(lambda: copy(list(zip(gpu, host)), n))
            row(f"h2d_s{n}", s, total, correct=registry.fingerprints([j.dst for j in jobs]) == want)
        half = len(jobs) // 2
        pairs_out = list(zip(host[:half], gpu[:half]))
        pairs_in = list(zip(gpu[half:], host[half:]))

        def duplex():
            up, down = torch.cuda.Stream(), torch.cuda.Stream()
            with torch.cuda.stream(up):
                for d, h in pairs_out:
                    d.copy_(h, non_blocking=True)
            with torch.cuda.stream(down):
                for d, h in pairs_in:
                    d.copy_(h, non_blocking=True)
            up.synchronize()
            down.synchronize()
        s, _ = timed(duplex)
        row("duplex", s, total)
        del host, pairs_out, pairs_in
        s, _ = timed(pool.close)
        row("free_registered", s)

        def alloc_torch():
            return torch.empty(total, dtype=torch.uint8, pin_memory=True)
        s, block = timed(alloc_torch)
        row("alloc_torch", s)
        del block
        empty = getattr(torch._C, "_host_emptyCache", None)
        s, _ = timed(lambda: empty and empty())
        row("free_torch", s)

        if loader.read_only_register_supported():
            with open(a.file, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                whole = torch.frombuffer(m, dtype=torch.uint8)
            size = -(-whole.numel() // loader.PAGE) * loader.PAGE
            s, _ = timed(lambda: register_read_only(whole.data_ptr(), size))
            row("held_register", s)
            src = [whole[j.offset:j.offset + j.length] for j in jobs]
            for n in (1, 4):
                for g in gpu:
                    g.zero_()
                s, _ = timed(lambda: copy(list(zip(gpu, src)), n))
                row(f"held_h2d_s{n}", s, total, correct=registry.fingerprints([j.dst for j in jobs]) == want)
            s, _ = timed(lambda: torch.cuda.cudart().cudaHostUnregister(whole.data_ptr()))
            row("held_unregister", s)
            del src, whole
            m.close()

    os.makedirs(a.out, exist_ok=True)
    slug = "h200" if "H200" in card else card.split()[-1].lower()
    with open(os.path.join(a.out, f"host_park_probe_{slug}.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Parking SDK weights in host memory — {card}", "",
             f"{total / 1e9:.2f} GB in {len(jobs)} tensors, page cache warm. Pinned H2D floor "
             f"{res['floors']['pinned_h2d']} GB/s.", "",
             "| row | runs | seconds (median) | GB/s (median) | correct |", "|---|---|---|---|---|"]
    by: dict = {}
    for r in res["rows"]:
        by.setdefault(r["row"], []).append(r)
    for name, rs in by.items():
        gb = [r["gbps"] for r in rs if "gbps" in r]
        ok = [r["correct"] for r in rs if "correct" in r]
        lines.append(f"| {name} | {len(rs)} | {statistics.median(r['seconds'] for r in rs):.3f} | "
                     f"{round(statistics.median(gb), 2) if gb else '-'} | {all(ok) if ok else '-'} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, f"host_park_probe_{slug}.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
