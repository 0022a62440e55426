"""Would a store seeded with a model's weights file make the first dump of its server
write little? Measures the idea before it is built (a `gpusnap seed FILE` that stores a
safetensors file's tensors as the page stream would cut them, under a manifest that keeps
them from gc): the first transparent dump of an LLM server writes its weights again
(16 GB of an 8B server's 17 GB of images) at the disk's pace, though they already lie on
that node's disk.

    python benchmarks/seed_probe.py probe --store STORE SNAP FILE.safetensors [...]
    python benchmarks/seed_probe.py server --size 1b [--work DIR]     (GPU machine)
    python benchmarks/seed_probe.py cpu [--mib 256] [--phase 0]       (CPU host)

probe: each tensor's whole pages, from its first byte, cut as the page stream cuts a run
of pages (store/chunker.py's run_spans), each chunk's id by the store's
codec; then the share of the snapshot's non-zero page bytes held in chunks the seed would
have (what a seeded store would not write again), and with --pages the share of its
non-zero 4 KiB pages found among the tensors' pages at tensor-relative offsets (what
any cut could reach). server: makes the llm_server's model (tests/workloads), starts the
server, dumps it (--leave-running) and probes that snapshot against its weights.
cpu: a holder (tests/workloads/weightholder.py) reads a synthetic safetensors file
(random bf16, tensors of 8 KiB to 24 MiB, some not a whole number of pages) into
anonymous memory, each tensor at a page-aligned address plus --phase bytes, and is
dumped and probed: the chunker's side of
the question without a GPU (the driver's host copy of device memory is the GPU side).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cold_start import gpusnap  # noqa: E402  (gpusnap CLI --json, raising on failure)

PAGE = 4096


def seed_ids(files: list[str], chunk_id) -> tuple[set[str], int, set[bytes]]:
    """The chunk ids a seed of files would hold, the bytes they cover, and the blake2b of
    every whole page of every tensor."""
    from gpusnap.store.chunker import run_spans
    from gpusnap.store.seed import tensor_ranges
    ids: set[str] = set()
    pages: set[bytes] = set()
    covered = 0
    for path in files:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        view = memoryview(mm)
        try:
            for start, end in tensor_ranges(path):
                n = (end - start) // PAGE
                if not n:
                    continue
                run = view[start:start + n * PAGE]
                for off, length in run_spans(run):
                    ids.add(chunk_id(run[off:off + length]))
                    covered += length
                for i in range(n):
                    pages.add(hashlib.blake2b(run[i * PAGE:(i + 1) * PAGE], digest_size=12).digest())
                run.release()
        finally:
            view.release()
            mm.close()
    return ids, covered, pages


def probe(store: str, snap: str, files: list[str], with_pages: bool) -> dict:
    from gpusnap.model.manifest import ZERO_ID
    from gpusnap.store import Repository
    repo = Repository.open(store)
    m = repo.load(snap)
    t = time.perf_counter()
    ids, covered, tensor_pages = seed_ids(files, repo.codec.chunk_id)
    seed_s = time.perf_counter() - t
    total = hit = 0
    for entry in m.files:
        if not entry.path.startswith("pages-"):
            continue
        for cid, n in entry.chunks:
            if cid == ZERO_ID:
                continue
            total += n
            if cid in ids:
                hit += n
    out = {"snapshot": snap, "weights_bytes": sum(os.path.getsize(f) for f in files),
           "seed_chunks": len(ids), "seed_bytes": covered, "seed_cut_s": round(seed_s, 2),
           "image_nonzero_bytes": total, "held_by_seed_bytes": hit,
           "held_by_seed_share": hit / total if total else 0.0}
    if with_pages:
        found = pages = 0
        zero = hashlib.blake2b(bytes(PAGE), digest_size=12).digest()
        with tempfile.TemporaryDirectory(prefix="seed-probe-", dir="/dev/shm") as dest:
            repo.materialise(m, dest)
            for entry in m.files:
                if not entry.path.startswith("pages-"):
                    continue
                with open(os.path.join(dest, entry.path), "rb") as f:
                    while page := f.read(PAGE):
                        h = hashlib.blake2b(page, digest_size=12).digest()
                        if h == zero:
                            continue
                        pages += 1
                        found += h in tensor_pages
        out.update(image_nonzero_pages=pages, pages_in_weights_share=found / pages if pages else 0.0)
    return out


def table(row: dict, what: str) -> str:
    lines = [f"# Seed probe — {what}", "",
             "| weights GB | image non-zero GB | held by a seed of the weights GB | share | "
             "pages found in the weights (any cut) |", "|---|---|---|---|---|",
             f"| {row['weights_bytes'] / 1e9:.2f} | {row['image_nonzero_bytes'] / 1e9:.2f} | "
             f"{row['held_by_seed_bytes'] / 1e9:.2f} | {row['held_by_seed_share']:.1%} | "
             + (f"{row['pages_in_weights_share']:.1%} |" if "pages_in_weights_share" in row else "- |")]
    return "\n".join(lines) + "\n"


# ---- the CPU stand-in ------------------------------------------------------------------

def bf16_header(sizes: list[int]) -> tuple[bytes, int]:
    """A safetensors file's head (length and JSON header, padded to 8) for bf16 tensors
    t0, t1, ... of these byte sizes, one after the other; and their bytes in all."""
    header, off = {}, 0
    for i, size in enumerate(sizes):
        header[f"t{i}"] = {"dtype": "BF16", "shape": [size // 2], "data_offsets": [off, off + size]}
        off += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, off


def make_safetensors(path: str, mib: int, seed: int = 7) -> None:
    """Random bf16 tensors (8 KiB to 24 MiB, some not whole pages) adding up to ~mib MiB."""
    rnd = random.Random(seed)
    sizes, total = [], 0
    while total < mib << 20:
        size = rnd.choice([8 << 10, 4096 * 3 + 1024, 1 << 20, 6 << 20, 24 << 20, (2 << 20) + 512])
        sizes.append(size)
        total += size
    head, off = bf16_header(sizes)
    with open(path, "wb") as f:
        f.write(head)
        left = off
        while left:
            n = min(left, 8 << 20)
            f.write(rnd.randbytes(n))
            left -= n


def cpu(args) -> dict:
    work = args.work or tempfile.mkdtemp(prefix="seed-probe-")
    os.makedirs(work, exist_ok=True)
    weights = os.path.join(work, "model.safetensors")
    make_safetensors(weights, args.mib)
    state_dir = os.path.join(work, "holder")
    state = os.path.join(state_dir, "ready")
    proc = subprocess.Popen([sys.executable, "-m", "tests.workloads.weightholder", weights,
                             "--phase", str(args.phase), "--state", state_dir], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not os.path.exists(state):
            if proc.poll() is not None:
                raise SystemExit("the holder died")
            time.sleep(0.05)
        store = os.path.join(work, "store")
        snap = gpusnap("dump", "--pid", str(proc.pid), "--leave-running", store=store)
    finally:
        proc.kill()
        proc.wait()
    row = probe(store, snap["id"], [weights], args.pages)
    row.update(phase=args.phase, mib=args.mib, dump_bytes_new=snap["bytes_new"])
    return row


def server(args) -> dict:
    import cold_start
    work = args.work or "/tmp/gpusnap-seed-probe"
    model_dir = os.path.join(work, "models", args.size)
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        r = cold_start.sh([sys.executable, "-m", "tests.workloads.llm_server", "make", "--size",
                           args.size, "--out", model_dir], cwd=REPO)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
    proc, _t, _tokens, _info = cold_start.start_server(model_dir, os.path.join(work, "state"))
    store = os.path.join(work, "store")
    try:
        snap = gpusnap("dump", "--pid", str(proc.pid), "--leave-running", store=store)
    finally:
        cold_start.kill_tree(cold_start.tree(proc.pid))
        proc.wait()
    row = probe(store, snap["id"], [os.path.join(model_dir, "model.safetensors")], args.pages)
    row.update(size=args.size, dump_bytes_new=snap["bytes_new"], dump_s=snap["timings"])
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--store", required=True)
    p.add_argument("snapshot")
    p.add_argument("files", nargs="+")
    s = sub.add_parser("server")
    s.add_argument("--size", default="1b")
    c = sub.add_parser("cpu")
    c.add_argument("--mib", type=int, default=256)
    c.add_argument("--phase", type=int, default=0, help="bytes past a page start of each tensor")
    for q in (p, s, c):
        q.add_argument("--pages", action="store_true", help="also the page-level share (reads the images)")
    for q in (s, c):
        q.add_argument("--work")
        q.add_argument("--out", help="write seed_probe_<what>.md/.json here")
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        row = probe(args.store, args.snapshot, args.files, args.pages)
        what = args.snapshot
    elif args.cmd == "cpu":
        row = cpu(args)
        what = f"cpu ({os.cpu_count()} cores), {args.mib} MiB synthetic, phase {args.phase}"
    else:
        row = server(args)
        import torch
        what = f"{torch.cuda.get_device_name(0)}, llm_server {args.size}"
    print(json.dumps(row), flush=True)
    text = table(row, what)
    print(text)
    if getattr(args, "out", None):
        os.makedirs(args.out, exist_ok=True)
        tag = f"{args.cmd}_{args.size if args.cmd == 'server' else f'{args.mib}mib_phase{args.phase}'}"
        with open(os.path.join(args.out, f"seed_probe_{tag}.json"), "w") as f:
            json.dump(row, f, indent=1)
        with open(os.path.join(args.out, f"seed_probe_{tag}.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
