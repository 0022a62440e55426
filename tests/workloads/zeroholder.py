"""A process whose memory mixes zero and nonzero pages in every kind of mapping, and that
can prove after a restore that each still reads as it did (zero-page elision's semantics).

    python -m tests.workloads.zeroholder --state DIR --file PATH

Mappings, each with zero runs of 1 page, 3 pages and 1 MiB among random pages:
  anon     MAP_PRIVATE|MAP_ANONYMOUS              (zero pages may be dropped)
  private  MAP_PRIVATE of PATH, zeroed in memory  (the file is not zero: must be kept)
  shared   MAP_SHARED|MAP_ANONYMOUS               (shmem: never touched)
  cow      anonymous, filled before fork(); the child zeroes its copy's pages, so CRIU
           restores the child's area from the parent's and must clear what it leaves out
Writes DIR/ready (json: pid, child) once in place; on SIGUSR1 writes DIR/report.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import signal
import time

PAGE = 4096
SIZE = 8 << 20
ZERO_PAGES = [0, 5, 6, 7, *range(512, 768), SIZE // PAGE - 1]


def _fill(m: mmap.mmap, seed: int) -> None:
    m[:] = random.Random(seed).randbytes(len(m))


def _zero(m: mmap.mmap) -> None:
    for p in ZERO_PAGES:
        m[p * PAGE:(p + 1) * PAGE] = bytes(PAGE)


def _digest(m) -> str:
    return hashlib.sha256(m[:]).hexdigest()


def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.rename(path + ".tmp", path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", required=True)
    ap.add_argument("--file", required=True)
    args = ap.parse_args()

    anon = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _fill(anon, 1)
    _zero(anon)

    with open(args.file, "wb") as f:
        f.write(random.Random(2).randbytes(SIZE))
    fd = os.open(args.file, os.O_RDWR)
    private = mmap.mmap(fd, SIZE, flags=mmap.MAP_PRIVATE)
    os.close(fd)
    _zero(private)

    shared = mmap.mmap(-1, SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    _fill(shared, 3)
    _zero(shared)

    cow = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _fill(cow, 4)
    cow_parent = _digest(cow)
    expected = {"anon": _digest(anon), "private": _digest(private), "shared": _digest(shared)}

    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(to_child_w)
        os.close(from_child_r)
        _zero(cow)
        cow_child = _digest(cow)
        while True:
            if not os.read(to_child_r, 16):
                os._exit(0)
            ok = _digest(cow) == cow_child and all(
                cow[p * PAGE:(p + 1) * PAGE] == bytes(PAGE) for p in ZERO_PAGES)
            os.write(from_child_w, b"ok\n" if ok else b"bad\n")
    os.close(to_child_r)
    os.close(from_child_w)

    asked = [False]
    signal.signal(signal.SIGUSR1, lambda *_: asked.__setitem__(0, True))
    _write_json(os.path.join(args.state, "ready"), {"pid": os.getpid(), "children": [child]})
    ticks = 0
    while True:
        ticks += 1
        time.sleep(0.02)
        if asked[0]:
            asked[0] = False
            os.write(to_child_w, b"check\n")
            child_ok = os.read(from_child_r, 16).strip() == b"ok"
            _write_json(os.path.join(args.state, "report.json"), {
                "pid": os.getpid(), "ticks": ticks,
                "anon_ok": _digest(anon) == expected["anon"],
                "private_ok": _digest(private) == expected["private"],
                "shared_ok": _digest(shared) == expected["shared"],
                "cow_parent_ok": _digest(cow) == cow_parent,
                "cow_child_ok": child_ok})


if __name__ == "__main__":
    main()
