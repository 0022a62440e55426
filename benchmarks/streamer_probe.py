"""CRIU's two ways of handing a dump to another process, measured on this (CPU) host.

    python benchmarks/streamer_probe.py [--mib 896] [--zero-mib 128] [--runs 5] [--out DIR]

One idle process tree (memholder: random data, some touched zero pages, two children,
two threads) dumped again and again with --leave-running, the rows in turn, into sinks
that keep nothing and count bytes:

- tmpfs:       plain `criu dump` into a directory on /dev/shm (the baseline)
- pageserver:  `criu dump --page-server --ps-socket FD`, served by gpusnap's own
               gpusnap/criu/pageserver.py into a sink that reads every page into one
               buffer (dump_probe.NullSink): what gpusnap's dump does, less the store.
               The other images still go to the images dir (tmpfs)
- stream_read: `criu dump --stream` to CaptureServer below, CRIU's image streamer
               protocol: every image, pages included, comes as a pipe; each pipe is read
               into one buffer to its end (what a store that hashes pages would have to do)
- stream_splice: the same, each pipe spliced into /dev/null: the ceiling, no page ever
               copied into this process (what criu-image-streamer does when it writes a
               stream out to a file descriptor)

Wall clock of the whole CRIU command (and, for the streamer, until the last pipe is
drained), medians of --runs. The streamer rows also record when each image's first and
last byte came: the order pagemap-*.img and pages-*.img arrive in, which a consumer
that wants pages with their addresses depends on. Writes OUT/criu_streamer_probe_cpu.md
and .json.

The streamer protocol (CRIU's criu/img-streamer.c): CRIU connects to the UNIX socket
IMAGES/streamer-capture.sock; for each image it opens it sends

    REQUEST ::= size u32 (native order) | img_streamer_request_entry (protobuf: filename = 1)
    FD      ::= one byte, with a pipe's read end in SCM_RIGHTS

and writes the image, magic first, into the pipe's other end; closing it ends the image.
CRIU closes the socket when it opens no more images. On dump nothing is ever sent back.
"""

from __future__ import annotations

import argparse
import array
import fcntl
import json
import os
import platform
import selectors
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_paths import check, kill_tree, start_tree, tree  # noqa: E402
from dump_probe import NullSink  # noqa: E402

from gpusnap.criu import pageserver, runner  # noqa: E402
from gpusnap.criu.argv import CriuOptions  # noqa: E402
from gpusnap.criu.locate import find_criu  # noqa: E402
from gpusnap.imagefile.protobuf import decode_fields  # noqa: E402

SOCKET_NAME = "streamer-capture.sock"
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
ROWS = ("tmpfs", "pageserver", "stream_read", "stream_splice")


# ---- the streamer's end ---------------------------------------------------------------
def parse_request(buf: bytes) -> tuple[str, int] | None:
    """(filename, bytes used) of the first REQUEST in buf, without its FD byte; None
    while buf holds less than a whole one."""
    if len(buf) < 4:
        return None
    (size,) = struct.unpack_from("=I", buf)
    if len(buf) < 4 + size:
        return None
    msg = bytes(buf[4:4 + size])
    name = decode_fields(msg).get(1) if msg else None      # field 1: the image's name
    if not isinstance(name, bytes):
        raise ValueError(f"not an img_streamer_request_entry: {msg[:16]!r}")
    return name.decode(), 4 + size


class CaptureServer:
    """Accepts one `criu dump --stream` and drains every image pipe it is handed, all at
    once (CRIU writes a pagemap and its pages image at the same time: reading one pipe to
    its end before the other could block CRIU). mode 'read' copies each pipe into one
    buffer, 'splice' moves it to /dev/null. Keeps per image: bytes, open order, and the
    times of its open, first byte and end."""

    def __init__(self, images: str, mode: str, pipe_size: int):
        self.mode, self.pipe_size = mode, pipe_size
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.path.join(images, SOCKET_NAME))
        self.listener.listen(1)
        self.listener.settimeout(60)
        self.images: dict[str, dict] = {}
        self.last_pages: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = 0.0

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.thread.start()

    def join(self) -> None:
        self.thread.join()
        if self.error:
            raise self.error

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 (handed to join)
            self.error = exc
        finally:
            self.listener.close()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        buf = memoryview(bytearray(16 << 20))
        null = os.open(os.devnull, os.O_WRONLY)
        sel = selectors.DefaultSelector()
        sel.register(conn, selectors.EVENT_READ, None)
        pending, fds, live = b"", [], 1
        try:
            while live:
                for key, _ in sel.select():
                    if key.data is None:
                        got, newfds = self._recv(conn)
                        if not got:
                            sel.unregister(conn)
                            live -= 1
                            continue
                        pending += got
                        fds += newfds
                        while True:
                            req = parse_request(pending)
                            if req is None or len(pending) < req[1] + 1 or not fds:
                                break
                            pending = pending[req[1] + 1:]
                            fd = fds.pop(0)
                            self._open(req[0], fd)
                            sel.register(fd, selectors.EVENT_READ, req[0])
                            live += 1
                    else:
                        if not self._drain(key.fd, key.data, buf, null):
                            sel.unregister(key.fd)
                            os.close(key.fd)
                            live -= 1
        finally:
            os.close(null)
            conn.close()

    @staticmethod
    def _recv(conn: socket.socket) -> tuple[bytes, list[int]]:
        data, anc, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4))
        fds: list[int] = []
        for level, kind, body in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(body[:len(body) - len(body) % arr.itemsize])
                fds += arr
        return data, fds

    def _open(self, name: str, fd: int) -> None:
        """A pipe's pipe_size: asked for, kept as it came when refused (above
        fs.pipe-max-size without CAP_SYS_RESOURCE); the size it has is recorded."""
        if self.pipe_size:
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, self.pipe_size)
            except OSError:
                pass
        if name.startswith("pages-"):
            self.last_pages = name
        self.images[name] = {"order": len(self.images), "bytes": 0, "reads": 0,
                             "open": time.perf_counter() - self.t0, "first": None, "end": None,
                             "pipe_size": fcntl.fcntl(fd, F_GETPIPE_SZ)}

    def _drain(self, fd: int, name: str, buf: memoryview, null: int) -> bool:
        """One read (or splice) of a pipe; False at its end."""
        if self.mode == "splice":
            n = os.splice(fd, null, 1 << 24)
        else:
            n = os.readv(fd, [buf])
        img = self.images[name]
        now = time.perf_counter() - self.t0
        if not n:
            img["end"] = now
            return False
        if img["first"] is None:
            img["first"] = now
        if name.startswith("pagemap-") and self.last_pages:
            # how far its pages (the pages image opened last) had come when this read came
            img.setdefault("pages_bytes_at_reads", []).append(self.images[self.last_pages]["bytes"])
        img["bytes"] += n
        img["reads"] += 1
        return True


# ---- the page server's end ------------------------------------------------------------
class CountingSink(NullSink):
    """NullSink, also counting pagemaps opened and entries (present or not)."""

    def __init__(self):
        super().__init__()
        self.pagemaps = self.entries = self.present = 0

    def open(self, kind, ident):
        self.pagemaps += 1

    def add(self, kind, ident, vaddr, nr_pages, flags, fill):
        self.entries += 1
        self.present += bool(fill)
        super().add(kind, ident, vaddr, nr_pages, flags, fill)


# ---- rows ---------------------------------------------------------------------------
def local_images(images: str) -> dict:
    names = [n for n in os.listdir(images) if n.endswith(".img")]
    size = {n: os.path.getsize(os.path.join(images, n)) for n in names}
    return {"local_images": len(names), "local_bytes": sum(size.values()),
            "local_pages_bytes": sum(v for n, v in size.items() if n.startswith("pages-"))}


def one_row(row: str, pid: int, images: str, pipe_size: int) -> dict:
    shutil.rmtree(images, ignore_errors=True)
    os.makedirs(images)
    opts = CriuOptions()
    out: dict = {}
    server = sink = None
    t0 = time.perf_counter()
    if row == "pageserver":
        sink = CountingSink()
        runner.dump(pid, images, opts, leave="running",
                    page_server=lambda sock, alive: pageserver.serve(sock, sink, alive=alive))
    elif row.startswith("stream_"):
        server = CaptureServer(images, row.removeprefix("stream_"), pipe_size)
        server.start(t0)
        runner.dump(pid, images, CriuOptions(extra=["--stream"]), leave="running")
        server.join()
    else:
        runner.dump(pid, images, opts, leave="running")
    out["s"] = time.perf_counter() - t0
    out.update(local_images(images))
    if sink:
        out.update(sent_bytes=sink.bytes, pagemaps=sink.pagemaps, entries=sink.entries,
                   present_entries=sink.present)
    if server:
        imgs = server.images
        out.update(sent_bytes=sum(i["bytes"] for i in imgs.values()), sent_images=len(imgs),
                   sent_pages_bytes=sum(i["bytes"] for n, i in imgs.items() if n.startswith("pages-")),
                   images=imgs)
    out["pages_bytes"] = out["local_pages_bytes"] + out.get("sent_pages_bytes", 0) + \
        (sink.bytes if sink else 0)
    shutil.rmtree(images, ignore_errors=True)
    return out


def page_order(images: dict) -> list[dict]:
    """Each pages image beside the pagemap opened just before it: when each arrived."""
    by_order = sorted(images.items(), key=lambda kv: kv[1]["order"])
    out = []
    for (pm, a), (pg, b) in zip(by_order, by_order[1:]):
        if pm.startswith(("pagemap-", "pagemap-shmem-")) and pg.startswith("pages-"):
            out.append({"pagemap": pm, "pages": pg, "pagemap_bytes": a["bytes"],
                        "pages_bytes": b["bytes"],
                        "pages_bytes_at_pagemap_reads": a.get("pages_bytes_at_reads", []),
                        "pagemap_first": a["first"], "pagemap_end": a["end"],
                        "pages_first": b["first"], "pages_end": b["end"]})
    return out


def table(rows: dict, meta: dict) -> str:
    med = {r: {k: statistics.median(x[k] for x in runs) for k in runs[0]
               if isinstance(runs[0][k], (int, float))} for r, runs in rows.items()}
    base = med["tmpfs"]["s"] if "tmpfs" in med else float("nan")
    out = [f"# CRIU's page server beside its image streamer — {meta['host']}", "",
           f"Kernel {meta['kernel']}, CRIU {meta['criu']}, Python {meta['python']}. An idle "
           f"{meta['tree_mib']} MiB process tree (memholder: {meta['mib']} MiB random, "
           f"{meta['zero_mib']} MiB touched zero pages, 2 children of 16 MiB, 2 threads), dumped "
           f"--leave-running by every row in turn; medians of {meta['runs']}, wall clock of the "
           f"CRIU command (streamer rows: until the last pipe is drained); MB/s: the pages "
           f"CRIU dumped (every row the same bytes: the tree's resident memory, interpreters "
           f"included) over that. `python benchmarks/streamer_probe.py`.", "",
           "| row | wall s | MB/s of pages | / tmpfs | pages MB | bytes to the sink | "
           "images to the sink | images written locally (bytes) |", "|---|---|---|---|---|---|---|---|"]
    for r, m in med.items():
        sent = m.get("sent_bytes")
        out.append(f"| {r} | {m['s']:.3f} | {m['pages_bytes'] / 1e6 / m['s']:.0f} | "
                   f"{m['s'] / base:.2f}x | {m['pages_bytes'] / 1e6:.1f} | "
                   f"{f'{sent / 1e6:.1f} MB' if sent else '-'} | "
                   f"{int(m['sent_images']) if 'sent_images' in m else ('pages only' if sent else '-')} | "
                   f"{int(m['local_images'])} ({m['local_bytes'] / 1e6:.1f} MB) |")
    ps = rows.get("pageserver", [{}])[-1]
    out += ["", f"Page server, last run: {ps.get('pagemaps')} pagemaps opened, {ps.get('entries')} "
            f"entries ({ps.get('present_entries')} with pages), {ps.get('sent_bytes', 0) / 1e6:.1f} MB "
            "of pages; every entry comes as its address and length, then its pages.", ""]
    st = rows.get("stream_read", [{}])[-1]
    if st:
        out += ["Image streamer, last stream_read run, pagemap and pages in the order CRIU opened them "
                f"(seconds from the start of the command; pipes of "
                f"{st['images']['pages-1.img']['pipe_size'] >> 10} KiB):", "",
                "| pagemap (bytes) | first byte .. end | pages (bytes) | first byte .. end | "
                "MB of pages in before each pagemap read |", "|---|---|---|---|---|"]
        for p in page_order(st["images"]):
            before = p["pages_bytes_at_pagemap_reads"]
            out.append(f"| {p['pagemap']} ({p['pagemap_bytes']}) | {p['pagemap_first']:.3f} .. "
                       f"{p['pagemap_end']:.3f} | {p['pages']} ({p['pages_bytes']}) | "
                       f"{p['pages_first'] or 0:.3f} .. {p['pages_end']:.3f} | "
                       + ", ".join(f"{b / 1e6:.0f}" for b in before) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=896)
    ap.add_argument("--zero-mib", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--pipe-size", type=int, default=1 << 20,
                    help="F_SETPIPE_SZ of each image pipe the streamer rows get (0: leave it)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = ap.parse_args(argv)
    criu, version = find_criu()
    work = tempfile.mkdtemp(prefix="gpusnap-streamer-probe-", dir="/dev/shm")
    rows: dict[str, list] = {r: [] for r in args.rows.split(",")}
    state = os.path.join(work, "state")
    pid = start_tree(state, args.mib, zero_mib=args.zero_mib)
    pids = tree(pid)
    try:
        for k in range(args.runs):
            order = list(rows)
            order = order[k % len(order):] + order[:k % len(order)]    # each row first in turn
            for r in order:
                got = one_row(r, pid, os.path.join(work, "images"), args.pipe_size)
                print(json.dumps({"row": r, **{k: v for k, v in got.items() if k != "images"}}),
                      flush=True)
                rows[r].append(got)
        check(state, pid)                   # every dump left the tree running and intact
    finally:
        kill_tree(pids)
        shutil.rmtree(work, ignore_errors=True)
    meta = {"host": f"{platform.node()} ({os.cpu_count()} cores)", "kernel": platform.release(),
            "criu": f"{version} ({criu})", "python": platform.python_version(), "mib": args.mib,
            "zero_mib": args.zero_mib, "tree_mib": args.mib + args.zero_mib + 2 * 16,
            "runs": args.runs, "pipe_size": args.pipe_size}
    text = table(rows, meta)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "criu_streamer_probe_cpu")
    with open(base + ".md", "w") as f:
        f.write(text)
    with open(base + ".json", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
