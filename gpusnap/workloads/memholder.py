"""A process tree holding known data, that can prove after a restore that it is intact.

    python -m gpusnap.workloads.memholder --state DIR [--mib N] [--zero-mib Z]
        [--children K] [--threads T] [--mmap-file PATH]

Writes DIR/ready (json: pid, expected checksum) once its data is in place. On SIGUSR1
it checks everything it holds and writes DIR/report.json atomically: its own data, each
child's data (asked over a pipe and over a socketpair), thread liveness, a MAP_SHARED
file mapping, and a tick counter that keeps moving (state that lives only in memory).
Run it with stdio on files or /dev/null and in its own session: CRIU needs both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import signal
import socket
import threading
import time

MIB = 1 << 20


def make_data(mib: int, seed: int) -> bytearray:
    block = random.Random(seed).randbytes(MIB)
    parts = []
    for i in range(mib):
        parts.append(i.to_bytes(8, "little") + block[8:])
    return bytearray(b"".join(parts))


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.rename(tmp, path)


def child_main(rpipe: int, wpipe: int, sock: socket.socket, mib: int, seed: int) -> None:
    data = make_data(mib, seed)
    expected = hashlib.sha256(data).hexdigest()
    while True:
        msg = os.read(rpipe, 64)
        if not msg:
            os._exit(0)
        ok = hashlib.sha256(data).hexdigest() == expected
        os.write(wpipe, b"ok\n" if ok else b"bad\n")
        sock.sendall(b"pong" if ok else b"bad!")


def _parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", required=True)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--zero-mib", type=int, default=0)
    ap.add_argument("--children", type=int, default=0)
    ap.add_argument("--child-mib", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--mmap-file")
    ap.add_argument("--seed", type=int, default=1)
    return ap.parse_args(argv)


def _fork_children(args: argparse.Namespace) -> list[tuple]:
    """(pid, pipe to it, pipe from it, socket to it) of each child, each holding its data."""
    children = []
    for k in range(args.children):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        parent_sock, child_sock = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            os.close(to_child_w)
            os.close(from_child_r)
            parent_sock.close()
            child_main(to_child_r, from_child_w, child_sock, args.child_mib, args.seed + 1 + k)
        os.close(to_child_r)
        os.close(from_child_w)
        child_sock.close()
        children.append((pid, to_child_w, from_child_r, parent_sock))
    return children


def _map_file(path: str | None, seed: int) -> mmap.mmap | None:
    """A MAP_SHARED mapping of a 4 MiB file of known data (None: no --mmap-file)."""
    if not path:
        return None
    with open(path, "wb") as f:
        f.write(make_data(4, seed + 100))
    fd = os.open(path, os.O_RDWR)
    mapped = mmap.mmap(fd, 4 * MIB, mmap.MAP_SHARED)
    os.close(fd)
    return mapped


class _Holder:
    """The parent: its data, its children (forked first, before any thread), threads
    that keep counting, a mapped file; checks them all on SIGUSR1."""

    def __init__(self, args: argparse.Namespace):
        self.state = args.state
        self.children = _fork_children(args)
        self.data = make_data(args.mib, args.seed)
        self.zeros = bytearray(args.zero_mib * MIB)         # touched, all zero
        for off in range(0, len(self.zeros), 4096):
            self.zeros[off] = 0
        self.expected = hashlib.sha256(self.data).hexdigest()
        self.mapped = _map_file(args.mmap_file, args.seed)
        self.mapped_expected = hashlib.sha256(self.mapped[:]).hexdigest() if self.mapped else None
        self.counters = [0] * args.threads
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._spin, args=(i,), daemon=True)
                        for i in range(args.threads)]
        for t in self.threads:
            t.start()
        self.ticks = 0
        # A flag, not an Event: Event.set() in a handler deadlocks when the signal lands
        # while this thread holds the Event's lock inside Event.wait() (a handler runs in
        # the main thread, between two bytecodes) -- seen as a rare hang after SIGSTOP/SIGCONT.
        self.check_requested = False
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "check_requested", True))

    def _spin(self, i: int) -> None:
        while not self.stop.is_set():
            self.counters[i] += 1
            time.sleep(0.01)

    def report(self) -> None:
        kids = []
        for pid, w, r, s in self.children:
            os.write(w, b"check\n")
            kids.append({"pid": pid, "pipe": os.read(r, 16).decode().strip(),
                         "socket": s.recv(4).decode()})
        before = list(self.counters)
        time.sleep(0.05)
        mapped = self.mapped
        write_json(os.path.join(self.state, "report.json"), {
            "pid": os.getpid(), "time": time.time(), "ticks": self.ticks,
            "data_ok": hashlib.sha256(self.data).hexdigest() == self.expected,
            "zeros_ok": not any(self.zeros),
            "children": kids,
            "children_ok": all(k["pipe"] == "ok" and k["socket"] == "pong" for k in kids),
            "threads_alive": sum(1 for t in self.threads if t.is_alive()),
            "threads_moving": all(a > b for a, b in zip(self.counters, before))
            if self.threads else True,
            "mmap_ok": (hashlib.sha256(mapped[:]).hexdigest() == self.mapped_expected)
            if mapped else None,
        })

    def run(self) -> None:
        write_json(os.path.join(self.state, "ready"), {
            "pid": os.getpid(), "checksum": self.expected,
            "children": [c[0] for c in self.children]})
        data = self.data
        while True:
            self.ticks += 1
            data[self.ticks % len(data) // 4096 * 4096 + 7] ^= 0    # touch a page, keep contents
            time.sleep(0.05)
            if self.check_requested:
                self.check_requested = False
                self.report()


def main() -> None:
    _Holder(_parse_args()).run()


if __name__ == "__main__":
    main()
