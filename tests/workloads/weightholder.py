"""A stand-in for an LLM server's weights in memory: each tensor of a safetensors file read
into anonymous memory from a page start (as a GPU allocator's blocks, which the CUDA
driver's host copy lays out on whole pages), one after another; can prove after a restore
that every tensor still reads as in the file (what `gpusnap seed` must not change).

    python -m tests.workloads.weightholder FILE --state DIR [--phase BYTES]

--phase puts each tensor that many bytes past its page start (off the page grid: a seed
then holds none of its chunks). Writes DIR/ready (json: pid) once in place; on SIGUSR1
writes DIR/report.json (data_ok). benchmarks/seed_probe.py and seed_dump.py use it too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import signal
import time

PAGE = 4096


def _tensors(path: str) -> list[tuple[int, int]]:
    from gpusnap.store.seed import tensor_ranges
    return tensor_ranges(path)


def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.rename(path + ".tmp", path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("--state", required=True)
    ap.add_argument("--phase", type=int, default=0)
    args = ap.parse_args(argv)
    ranges = _tensors(args.weights)
    step = [-(-(e - s + args.phase) // PAGE) * PAGE for s, e in ranges]
    mem = mmap.mmap(-1, max(PAGE, sum(step)))
    at, where = 0, []
    with open(args.weights, "rb") as f:
        for (s, e), n in zip(ranges, step):
            f.seek(s)
            mem[at + args.phase:at + args.phase + (e - s)] = f.read(e - s)
            where.append((at + args.phase, s, e))
            at += n
    digest = hashlib.sha256(mem[:]).hexdigest()
    asked = [False]
    signal.signal(signal.SIGUSR1, lambda *_: asked.__setitem__(0, True))
    os.makedirs(args.state, exist_ok=True)
    _write_json(os.path.join(args.state, "ready"), {"pid": os.getpid(), "tensors": len(ranges)})
    while True:
        time.sleep(0.02)
        if asked[0]:
            asked[0] = False
            _write_json(os.path.join(args.state, "report.json"),
                        {"pid": os.getpid(), "data_ok": hashlib.sha256(mem[:]).hexdigest() == digest})


if __name__ == "__main__":
    main()
