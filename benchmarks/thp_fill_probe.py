"""How a restore could hand the driver its staging memory in huge pages: a probe.

    python benchmarks/thp_fill_probe.py [--gib 2] [--workers 2] [--runs 3] [--out DIR]

The driver restores device memory faster from 2 MiB pages than from 4 KiB ones (H200, 8 GiB:
2.16 -> 1.27 s, benchmarks/results/dump_probe_h200_thp.md), but a restore's uffd fill
places 4 KiB pages (UFFDIO_COPY allocates order-0 pages). Ways to get the same bytes into
another process's anonymous memory, in huge pages or not, each on a fresh target holding
--gib GiB of untouched private anonymous memory (THP mode as the host has it):

- uffd_4k:        UFFDIO_COPY from --workers forked workers into memory the target
                  registered with a userfaultfd (what a restore's fill does today)
- writev_4k:      process_vm_writev from the workers (faults in 4 KiB pages)
- writev_thp:     the same into memory the target madvised MADV_HUGEPAGE (faults in 2 MiB)
- writev_window:  the same into memory not madvised, in gpusnap's huge-page window (THP
                  `always` meanwhile: cuda/hugepages.py), what GPUSNAP_STAGING_THP does
- collapse:       writev_4k, then process_madvise(MADV_COLLAPSE) over the range from the
                  workers (the kernel copies each 2 MiB into a huge page): its own seconds
- each row says how much of the range ended in huge pages (AnonHugePages of smaps)

Needs root (process_madvise MADV_COLLAPSE: CAP_SYS_ADMIN) and Linux >= 6.1. Writes
OUT/thp_fill_probe_<host>.md/.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import signal
import statistics
import sys
import time

MIB = 1 << 20
PIECE = 16 * MIB
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
SYS_PIDFD_OPEN = 434
SYS_PROCESS_MADVISE = 440
SYS_PIDFD_GETFD = 438
SYS_USERFAULTFD = 323
UFFDIO_API = 0xC018AA3F         # struct uffdio_api { u64 api, features, ioctls }
UFFDIO_REGISTER = 0xC020AA00    # struct uffdio_register { u64 start, len, mode, ioctls }

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.process_vm_writev.restype = ctypes.c_ssize_t
libc.syscall.restype = ctypes.c_long


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def target(gib: float, huge: bool, uffd: bool, w: int) -> None:
    """In the forked target: map, advise or register with a userfaultfd, report the
    address (and the descriptor's number), wait to be killed."""
    import fcntl
    import struct
    size = int(gib * (1 << 30))
    addr = libc.mmap(None, size, 3, 0x22, -1, 0)        # RW, PRIVATE|ANON
    if huge:
        libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(size), MADV_HUGEPAGE)
    fd = -1
    if uffd:
        fd = libc.syscall(ctypes.c_long(SYS_USERFAULTFD), ctypes.c_int(os.O_CLOEXEC | os.O_NONBLOCK))
        if fd < 0:
            raise OSError(ctypes.get_errno(), "userfaultfd")
        fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("=QQQ", 0xAA, 0, 0)))
        fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(struct.pack("=QQQQ", addr, size, 1, 0)))
    os.write(w, json.dumps({"addr": addr, "size": size, "uffd": fd}).encode())
    os.close(w)
    while True:
        signal.pause()


def start(gib: float, huge: bool, uffd: bool = False) -> tuple[int, int, int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            target(gib, huge, uffd, w)
        finally:
            os._exit(0)
    os.close(w)
    info = json.loads(os.read(r, 4096))
    os.close(r)
    return pid, info["addr"], info["size"], info["uffd"]


def huge_bytes(pid: int, addr: int) -> int:
    """AnonHugePages of the target's mapping at addr."""
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split()[0] and not line.split()[0].endswith(":"):
                inside = int(line.split("-")[0], 16) == addr
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    return 0


def in_workers(n: int, fn, *args) -> float:
    """fn(i, n, *args) in n forked workers at once; the wall seconds until all are done."""
    t = time.perf_counter()
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                fn(i, n, *args)
            except BaseException:           # noqa: BLE001
                import traceback
                traceback.print_exc()
                code = 1
            os._exit(code)
        pids.append(pid)
    bad = [p for p in pids if os.waitpid(p, 0)[1]]
    if bad:
        raise RuntimeError(f"{len(bad)} workers failed")
    return time.perf_counter() - t


def _share(i: int, n: int, size: int) -> tuple[int, int]:
    """Worker i's [start, end) of size, in 2 MiB multiples."""
    units = size // (2 * MIB)
    lo, hi = units * i // n, units * (i + 1) // n
    return lo * 2 * MIB, hi * 2 * MIB


def write_share(i: int, n: int, pid: int, addr: int, size: int) -> None:
    src = mmap.mmap(-1, PIECE)
    src.write(os.urandom(PIECE))
    local = IoVec(ctypes.addressof(ctypes.c_char.from_buffer(src)), PIECE)
    start, end = _share(i, n, size)
    for off in range(start, end, PIECE):
        length = min(PIECE, end - off)
        local.len = length
        remote = IoVec(addr + off, length)
        done = libc.process_vm_writev(ctypes.c_int(pid), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if done != length:
            raise OSError(ctypes.get_errno(), f"process_vm_writev wrote {done} of {length}")


def copy_share(i: int, n: int, pid: int, addr: int, size: int, target_fd: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gpusnap.criu import uffd
    pidfd = libc.syscall(ctypes.c_long(SYS_PIDFD_OPEN), ctypes.c_int(pid), ctypes.c_uint(0))
    fd = libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(target_fd),
                      ctypes.c_uint(0))
    if pidfd < 0 or fd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_open/pidfd_getfd")
    src = mmap.mmap(-1, PIECE)
    src.write(os.urandom(PIECE))
    base = ctypes.addressof(ctypes.c_char.from_buffer(src))
    start, end = _share(i, n, size)
    for off in range(start, end, PIECE):
        uffd.copy(fd, addr + off, base, min(PIECE, end - off))


def collapse_share(i: int, n: int, pid: int, addr: int, size: int) -> None:
    pidfd = libc.syscall(ctypes.c_long(SYS_PIDFD_OPEN), ctypes.c_int(pid), ctypes.c_uint(0))
    if pidfd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_open")
    start, end = _share(i, n, size)
    for off in range(start, end, PIECE):
        length = min(PIECE, end - off)
        vec = IoVec(addr + off, length)
        got = libc.syscall(ctypes.c_long(SYS_PROCESS_MADVISE), ctypes.c_int(pidfd), ctypes.byref(vec),
                           ctypes.c_size_t(1), ctypes.c_int(MADV_COLLAPSE), ctypes.c_uint(0))
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"process_madvise(MADV_COLLAPSE): {os.strerror(err)}")


def run_row(name: str, gib: float, workers: int) -> dict:
    pid, addr, size, fd = start(gib, huge=(name == "writev_thp"), uffd=(name == "uffd_4k"))
    try:
        if name == "uffd_4k":
            out = {"write_s": in_workers(workers, copy_share, pid, addr, size, fd)}
        elif name == "writev_window":
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            from gpusnap.cuda import hugepages
            with hugepages.window(on=True):
                out = {"write_s": in_workers(workers, write_share, pid, addr, size)}
        else:
            out = {"write_s": in_workers(workers, write_share, pid, addr, size)}
        if name == "collapse":
            out["collapse_s"] = in_workers(workers, collapse_share, pid, addr, size)
        out["s"] = out["write_s"] + out.get("collapse_s", 0.0)
        out["gbs"] = size / out["s"] / 1e9
        out["huge_fraction"] = huge_bytes(pid, addr) / size
        return out
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", default="uffd_4k,writev_4k,writev_thp,writev_window,collapse")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    rows = {}
    for name in args.rows.split(","):
        runs = [run_row(name, args.gib, args.workers) for _ in range(args.runs)]
        rows[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(json.dumps({"row": name, **rows[name]}), flush=True)
    host = platform.node()
    lines = [f"# Huge pages into another process's memory — {host} ({os.cpu_count()} cores)", "",
             f"{args.gib} GiB per target, {args.workers} workers, medians of {args.runs}; kernel "
             f"{platform.release()}, THP `{thp}`. `python benchmarks/thp_fill_probe.py`.", "",
             "| row | wall s | GB/s | of which collapse s | in huge pages |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['s']:.3f} | {r['gbs']:.2f} | "
                     f"{r.get('collapse_s', 0):.3f} | {r['huge_fraction']:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    tag = "cpu" if not os.path.exists("/dev/nvidia0") else "gpu"
    with open(os.path.join(args.out, f"thp_fill_probe_{tag}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"thp_fill_probe_{tag}.json"), "w") as f:
        json.dump({"host": host, "cores": os.cpu_count(), "gib": args.gib, "thp": thp,
                   "kernel": platform.release(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
