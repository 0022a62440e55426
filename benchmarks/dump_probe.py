"""Where a dump's time goes: CRIU, its page stream, the store's workers, the disk.

    python benchmarks/dump_probe.py [--gib 8] [--runs 2] [--work /tmp/gpusnap-probe] [--out DIR]

A process holding --gib GiB of random bf16 (on the GPU where torch sees one: the CUDA
driver moves it to host memory first, as for an LLM server; else in host memory), fresh
for every row and dumped (and so killed) by it. Rows, same run, medians of --runs:

- naive:      CUDA lock + checkpoint, `criu dump` into /dev/shm (what a user runs by hand)
- null:       CUDA lock + checkpoint, `criu dump --page-server` into a sink that throws the
              pages away: the ceiling of CRIU and its socket, nothing stored
- null_splice: the same, the pages never read into gpusnap (spliced to /dev/null): CRIU's
              own pace; null against it is what the receiver's copy costs
- stream_shm: `gpusnap dump` (pages streamed) into a store on /dev/shm: the workers
              (zero pages, chunking, SHA-256, zstd) without a disk
- stream:     `gpusnap dump` into a store on --work's disk (durable)
- stream_l1:  the same with `--compress 1` (zstd with entropy coding: ~22% fewer bytes of
              bf16 to write, slower to decode at restore)
- stream_bf16: the same with `--compress bf16` (byte planes: ~32% fewer bytes of bf16)
- second:     the same data dumped again into that store (every chunk known)
- staged:     `gpusnap dump --pages staged` into a fresh store on disk
- twice:      the driver alone: lock + checkpoint, restore + unlock, two rounds (does the
              first checkpoint pay for first-touching its staging memory?)
- NAME_thp:   row NAME with THP=always (e.g. naive_thp, stream_thp, twice_thp)
- NAME_cN:    row NAME with GPUSNAP_STREAM_COPIERS=N (second_c0: the receiver copies every
              page itself, as before the copy threads)
- NAME_sN:    row NAME with GPUSNAP_STREAM_SLOTS=N, the page stream's 16 MiB slots (stream_s128:
              2 GiB, CRIU runs ahead of workers waiting on the disk; default 1.5 a worker + 2)
- NAME_bN:    row NAME with GPUSNAP_PS_BUFFER_MB=N, the page stream's socket buffers
              (second_b64: 64 MiB, past the host's cap; the default asks 4, capped)

and floors: the disk's write rate with fsync (16 writers) and tmpfs's. Each gpusnap row
shows its stream_* timings: seconds the receiver read CRIU's pages (recv) and waited for a
free slot (slot_wait), worker-seconds finding zero pages, cutting, hashing and
compressing, writing and fsyncing. Writes OUT/dump_probe_<card>.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHM = "/dev/shm/gpusnap-probe"


# ---- the workload --------------------------------------------------------------------
def hold(gib: float, state: str) -> None:
    """Runs in the held process: random bf16 (fixed seed: every start holds the same
    bytes, so a second dump finds every chunk), then sleep until killed."""
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        torch, cuda = None, False
    held = []
    if cuda:
        g = torch.Generator(device="cuda").manual_seed(1234)
        left = int(gib * (1 << 30)) // 2
        while left:
            n = min(left, 1 << 28)
            held.append(torch.randn(n, dtype=torch.bfloat16, device="cuda", generator=g))
            left -= n
        torch.cuda.synchronize()
    else:
        import random
        held = [bytearray(random.Random(1234 + i).randbytes(64 << 20)) for i in range(int(gib * 16))]
    with open(state + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "cuda": cuda}, f)
    os.replace(state + ".tmp", state)
    while True:
        time.sleep(1)


def start(gib: float, work: str) -> tuple[subprocess.Popen, int, bool]:
    state = os.path.join(work, "holder.json")
    if os.path.exists(state):
        os.unlink(state)
    log = open(os.path.join(work, "holder.log"), "ab")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hold", str(gib), "--state", state],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    for _ in range(2400):
        if os.path.exists(state):
            with open(state) as f:
                got = json.load(f)
            return proc, got["pid"], got["cuda"]
        time.sleep(0.05)
    raise TimeoutError("the holder did not start (holder.log)")


def gone(proc: subprocess.Popen, timeout: float = 60) -> None:
    """The holder (our child: reaped here) has ended; killed after timeout."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- rows ----------------------------------------------------------------------------
class NullSink:
    """A PageSink that reads every page into one buffer and keeps nothing."""

    def __init__(self):
        self.buf = memoryview(bytearray(16 << 20))
        self.bytes = 0

    def open(self, kind, ident):
        pass

    def add(self, kind, ident, vaddr, nr_pages, flags, fill):
        left = nr_pages * 4096 if fill else 0
        while left:
            n = min(left, len(self.buf))
            fill(self.buf[:n])
            left -= n
            self.bytes += n

    def close(self):
        pass


class SpliceSink(NullSink):
    """A PageSink that passes over every page without reading it (fill.skip: spliced to
    /dev/null): the pace of CRIU's own side of the stream, no copy into gpusnap."""

    def add(self, kind, ident, vaddr, nr_pages, flags, fill):
        if fill:
            fill.skip(nr_pages * 4096)
            self.bytes += nr_pages * 4096


def by_hand(pid: int, cuda: bool, images: str, sink=None, leave: str = "killed",
            huge_pages: bool = False, cuda_pids: list[int] | None = None) -> dict:
    """CUDA lock + checkpoint of cuda_pids (default: pid; huge_pages: in gpusnap's
    huge-page window, else the host's THP mode as it is), then CRIU: into images, or its
    pages to sink. leave="running": CRIU leaves the tree running and the driver's restore
    + unlock follow (cuda_restore)."""
    from gpusnap.criu import pageserver, runner
    from gpusnap.criu.argv import CriuOptions
    shutil.rmtree(images, ignore_errors=True)
    os.makedirs(images)
    out = {}
    t0 = time.perf_counter()
    if cuda:
        from gpusnap.cuda.session import CudaSession
        s = CudaSession(cuda_pids if cuda_pids is not None else [pid], huge_pages=huge_pages)
        s.lock_all(10_000)
        s.checkpoint_all()
    t1 = time.perf_counter()
    serve = (lambda sock, alive: pageserver.serve(sock, sink, alive=alive)) if sink else None
    runner.dump(pid, images, CriuOptions(), leave=leave, page_server=serve)
    t2 = time.perf_counter()
    if cuda and leave == "running":
        s.restore_all()
        s.unlock_all()
    t3 = time.perf_counter()
    out.update(s=t3 - t0, cuda_checkpoint=t1 - t0, criu_dump=t2 - t1)
    if leave == "running":
        out["cuda_restore"] = t3 - t2
    if sink:
        out["bytes"] = sink.bytes
    else:
        out["bytes"] = sum(os.path.getsize(os.path.join(images, n)) for n in os.listdir(images)
                           if n.startswith("pages-"))
    shutil.rmtree(images, ignore_errors=True)
    return out


def gpusnap_dump(pid: int, store: str, pages: str = "stream", *more: str) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "gpusnap", "--store", store, "dump", "--pid", str(pid),
                        "--pages", pages, "--json", *more], cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"gpusnap dump failed ({p.returncode}): {p.stderr[-2000:]}")
    got = json.loads(p.stdout)
    return {"s": took, "bytes": got["bytes_logical"], "bytes_new": got["bytes_new"],
            "downtime": got.get("downtime"), **got["timings"]}


def checkpoint_twice(pid: int) -> dict:
    """The driver alone, two rounds: lock + checkpoint, restore + unlock, twice. Whether
    a process's first checkpoint pays for its staging memory's first touch (the switch
    row's first suspend took 6.5 s more than its second)."""
    from gpusnap.cuda.session import CudaSession
    out = {}
    for i in (1, 2):
        s = CudaSession([pid], huge_pages=False)    # the driver alone: the host's THP mode
        t0 = time.perf_counter()
        s.lock_all(10_000)
        s.checkpoint_all()
        t1 = time.perf_counter()
        s.restore_all(None)
        s.unlock_all()
        t2 = time.perf_counter()
        out.update({f"checkpoint_{i}": t1 - t0, f"restore_{i}": t2 - t1})
    out["s"] = sum(out.values())
    return out


def run_row(name: str, gib: float, work: str, store: str) -> dict:
    """One row on a fresh holder; a name ending in _thp runs with THP=always (anonymous
    memory in huge pages: the driver's staging memory faults in 2 MiB at a time), one
    ending in _direct with GPUSNAP_DIRECT_IO=1 (stream_direct, stream_bf16_direct)."""
    from cold_start import env_set      # the rows' gpusnap subprocesses inherit it
    if name.endswith("_direct"):        # chunk files written with O_DIRECT (GPUSNAP_DIRECT_IO)
        with env_set("GPUSNAP_DIRECT_IO", "1"):
            return run_row(name[:-len("_direct")], gib, work, store)
    head, _, copiers = name.rpartition("_c")
    if head and copiers.isdigit():      # stream_c0: GPUSNAP_STREAM_COPIERS=0 (the receiver copies)
        with env_set("GPUSNAP_STREAM_COPIERS", copiers):
            return run_row(head, gib, work, store)
    head, _, slots = name.rpartition("_s")
    if head and slots.isdigit():        # stream_s128: GPUSNAP_STREAM_SLOTS=128 (2 GiB of slots)
        with env_set("GPUSNAP_STREAM_SLOTS", slots):
            return run_row(head, gib, work, store)
    head, _, mib = name.rpartition("_b")
    if head and mib.isdigit():          # second_b64: GPUSNAP_PS_BUFFER_MB=64 (past the host's cap)
        with env_set("GPUSNAP_PS_BUFFER_MB", mib):
            return run_row(head, gib, work, store)
    if name.endswith("_thp"):
        from cold_start import thp_mode
        with thp_mode("always"):
            return run_row(name[:-len("_thp")], gib, work, store)
    proc, pid, cuda = start(gib, work)
    try:
        if name == "twice":
            return checkpoint_twice(pid) if cuda else {"s": 0.0}
        if name == "naive":
            return by_hand(pid, cuda, os.path.join(SHM, "images"))
        if name == "null":
            return by_hand(pid, cuda, os.path.join(work, "null-images"), NullSink())
        if name == "null_splice":
            return by_hand(pid, cuda, os.path.join(work, "null-images"), SpliceSink())
        if name == "stream_shm":
            shutil.rmtree(os.path.join(SHM, "store"), ignore_errors=True)
            try:
                return gpusnap_dump(pid, os.path.join(SHM, "store"))
            finally:
                shutil.rmtree(os.path.join(SHM, "store"), ignore_errors=True)
        if name in ("stream", "staged"):
            shutil.rmtree(store, ignore_errors=True)
            return gpusnap_dump(pid, store, "stream" if name == "stream" else "staged")
        if name in ("stream_l1", "stream_bf16"):
            level = name.split("_")[1].lstrip("l")
            shutil.rmtree(store + "-" + level, ignore_errors=True)
            try:
                return gpusnap_dump(pid, store + "-" + level, "stream", "--compress", level)
            finally:
                shutil.rmtree(store + "-" + level, ignore_errors=True)
        if name == "second":
            return gpusnap_dump(pid, store)
        raise ValueError(name)
    finally:
        gone(proc)


def table(rows: dict, floors: dict, card: str, gib: float) -> str:
    out = [f"# Dump probe — {card}", "",
           f"A process holding {gib:g} GiB of random bf16 ({'GPU' if 'cpu' not in card.lower() else 'host'} "
           f"memory), dumped fresh for each row; medians of {len(next(iter(rows.values())))}.", "",
           "Floors: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in floors.items()), "",
           "| row | wall s | cuda_checkpoint s | criu_dump s | image GB | GB/s in CRIU's stage | "
           "GB/s wall |", "|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0] if
             all(isinstance(r.get(k), (int, float)) for r in runs)}
        crit = m.get("criu_dump", 0)
        gb = m.get("bytes", 0) / 1e9
        out.append(f"| {name} | {m['s']:.2f} | {m.get('cuda_checkpoint', 0):.2f} | {crit:.2f} | "
                   f"{gb:.2f} | {gb / crit if crit else 0:.2f} | {gb / m['s'] if m['s'] else 0:.2f} |")
    out += ["", "Stages and stream timings (medians):", ""]
    for name, runs in rows.items():
        keys = [k for k in runs[0] if k not in ("s", "bytes") and
                all(isinstance(r.get(k), (int, float)) for r in runs)]
        out.append(f"- {name}: " + ", ".join(
            f"{k} {statistics.median(r[k] for r in runs):.3f}" for k in keys))
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=8)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rows", default="naive,null,stream_shm,stream,second,staged")
    ap.add_argument("--work", default="/tmp/gpusnap-probe")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--hold", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hold is not None:
        return hold(args.hold, args.state)
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(SHM, exist_ok=True)
    try:
        import torch
        card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    except ImportError:
        card = f"cpu ({os.cpu_count()} cores)"
    # memory first grown (a VM's memory can grow as it is touched), then the floors
    from cold_start import floor_disk_write
    floors = {"tmpfs_write": floor_disk_write(SHM, gib=args.gib, writers=16, sync=False),
              "disk_write_fsync": floor_disk_write(args.work, gib=min(args.gib, 4), writers=16)}
    try:        # whether the disk takes more without the page cache (O_DIRECT)
        floors["disk_write_direct"] = floor_disk_write(args.work, gib=min(args.gib, 4),
                                                       writers=16, direct=True)
    except OSError as exc:          # a filesystem without O_DIRECT (tmpfs): no floor
        print(json.dumps({"disk_write_direct": f"not measured: {exc}"}), flush=True)
    print(json.dumps({"floors": floors}), flush=True)
    store = os.path.join(args.work, "store")
    rows: dict[str, list] = {}
    for _ in range(args.runs):
        for name in args.rows.split(","):
            got = run_row(name, args.gib, args.work, store)
            print(json.dumps({"row": name, **got}), flush=True)
            rows.setdefault(name, []).append(got)
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(SHM, ignore_errors=True)
    text = table(rows, floors, card, args.gib)
    print(text, flush=True)
    tag = "h200" if "H200" in card else "cpu" if card.startswith("cpu") else card.replace(" ", "_").lower()
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"dump_probe_{tag}")
    with open(base + ".json", "w") as f:
        json.dump({"card": card, "gib": args.gib, "floors": floors, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
