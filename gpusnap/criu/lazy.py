"""The uffd page path: gpusnap, not CRIU, fills a restored tree's private memory.

    prepare(images)          mark the private anonymous pages of every pagemap PE_LAZY
                             (imagefile/lazy.py); returns what CRIU still reads itself
    Guard.start(work)        listen on work/lazy-pages.socket, before CRIU restore
    criu restore --lazy-pages --leave-stopped
                             CRIU builds the tree without those pages and hands over each
                             task's userfaultfd; the tasks stay stopped
    guard.receive()          the descriptors, in gpusnap
    fill(...)                worker processes decode the pages' chunks from the store and
                             place them with UFFDIO_COPY (many at once on one descriptor)
    guard.release()          every copy of the descriptors closed, then SIGCONT

Why gpusnap can do this faster than CRIU: CRIU writes every page from one thread; here
the store's chunks go straight from their files into the target's memory, decoded and
verified on as many workers as there are cores, and the pages images are never written
to the work dir.

Safety. A page never placed reads as zeros once the last copy of its userfaultfd is
closed; no task may ever run with such a page. So: the tasks are left stopped by CRIU
and continued only after every page is in; and the descriptors are also held by a
guard, a small process in its own session forked before CRIU starts. The guard takes
CRIU's connection, passes each descriptor on to gpusnap and keeps its own copy until
gpusnap says the pages are in. If gpusnap dies first (kill -9, OOM) the guard's copy
keeps the descriptors open (a task continued by someone else waits on the missing page,
it does not read zeros) and the guard SIGKILLs the restored tasks before it lets go. If
the guard dies, gpusnap sees its socket close and fails the restore, killing the tree.
Until gpusnap says the whole restore is done, the guard kills the tree when gpusnap goes
away, so a killed restore leaves no restored tree behind.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import io
import os
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass, field

from .. import sysrun
from ..cuda import staging
from ..errors import CriuFailed
from ..imagefile import lazy as lazy_plan
from ..imagefile import mm, pagemap
from . import uffd

SOCKET_NAME = "lazy-pages.socket"
_PID = struct.Struct("=i")
_END = -(1 << 31)                   # after the last descriptor gpusnap is given
FILLED, FILLED_ACK, DONE = b"F", b"f", b"D"
LATE, LATE_ACK, CHANGED = b"L", b"l", b"c"      # the late phase (Guard.late), its refusal


# ---- images ------------------------------------------------------------------------------

@dataclass
class Pages:
    """What the fill needs of one dump: per pages image, the lazy segments of each pid."""
    segments: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    eager: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)

    @property
    def tasks(self) -> int:
        """Live tasks of the dump (one pagemap each): how many descriptors CRIU sends."""
        return len({s[0] for segs in self.segments.values() for s in segs} | set(self.pids))


def prepare(names: list[str], read) -> tuple[Pages, dict[str, bytes]]:
    """Plan the lazy pages of a dump whose image files are names, read(name) giving a
    file's bytes (from the store, before anything is written). Returns, per pages image,
    its lazy segments (pid, vaddr, offset, length) and the ranges CRIU still reads (the
    caller materialises those), and the rewritten pagemap images (name -> bytes) with
    their PE_LAZY pieces, to write over the materialised ones."""
    out, rewritten = Pages(), {}
    for name in sorted(names):
        base = os.path.basename(name)
        if not (base.startswith("pagemap-") and base.endswith(".img")) or base.startswith("pagemap-shmem-"):
            continue
        pid = int(base[len("pagemap-"):-len(".img")])
        out.pids.add(pid)
        vmas = mm.parse(io.BytesIO(read(os.path.join(os.path.dirname(name), f"mm-{pid}.img"))))
        raw = pagemap.read_raw(io.BytesIO(read(name)))
        plan = lazy_plan.plan(raw, vmas)
        pages = os.path.join(os.path.dirname(name), f"pages-{raw.pages_id}.img")
        out.segments.setdefault(pages, []).extend((pid, v, off, n) for v, off, n in plan.segments)
        out.eager.setdefault(pages, []).extend(plan.eager)
        buf = io.BytesIO()
        pagemap.write(buf, raw, plan.payloads)
        rewritten[name] = buf.getvalue()
    return out, rewritten


def fill_items(pages: Pages, files: dict[str, list], zero_id: str) -> list[tuple]:
    """The fill's work, one item per stored chunk that holds lazy pages:
    (chunk id or None for a zero chunk, plain size, [(pid, vaddr, offset in the chunk,
    length)]).
    files: pages image name -> its manifest chunk list [[id, size], ...]. Zero chunks are
    placed too (as the zero page): a task that faults on one while CRIU restores it
    must be woken, and every lazy page placed is what makes continuing the tree safe."""
    items = []
    for name, segs in pages.segments.items():
        chunks = files[name]
        starts, off = [], 0
        for _cid, n in chunks:
            starts.append(off)
            off += n
        per_chunk: dict[int, list] = {}
        for pid, vaddr, seg_off, length in segs:
            i = bisect.bisect_right(starts, seg_off) - 1
            pos, end = seg_off, seg_off + length
            while pos < end:
                c_start = starts[i]
                c_end = c_start + chunks[i][1]
                n = min(end, c_end) - pos
                per_chunk.setdefault(i, []).append((pid, vaddr + pos - seg_off, pos - c_start, n))
                pos += n
                i += 1
        for i, pieces in sorted(per_chunk.items()):
            cid, n = chunks[i]
            items.append((None if cid == zero_id else cid, n, pieces))
    return items


def fill_batch(job, batch_index: int) -> tuple[int, int]:
    """Worker: decode each chunk of one batch and place its pieces. Returns (the batch's
    index, bytes placed). A remote store fetches the batch's chunks concurrently
    (read_blobs reads ahead). job: (repo, fds, batches, first late batch, [first, end)
    of the direct batches): a late batch is placed while the tree runs (engine/pagepath.py),
    where an area gone is skipped; a direct batch is written into areas taken out of the
    userfaultfd (unregister_spans) with process_vm_writev."""
    repo, fds, batches, first_late, direct = job
    items = batches[batch_index]
    late = batch_index >= first_late
    if late and os.environ.get("GPUSNAP_TEST_LATE_DELAY_MS", "").isdigit():   # tests: a slow fill
        time.sleep(int(os.environ["GPUSNAP_TEST_LATE_DELAY_MS"]) / 1000)
    put = place_direct if direct[0] <= batch_index < direct[1] else place
    blobs = repo.read_blobs([cid for cid, _n, _p in items if cid is not None])
    return batch_index, sum(put(repo, fds, cid, n, pieces,
                                next(blobs) if cid is not None else None, gone_ok=late)
                            for cid, n, pieces in items)


def place_direct(repo, fds: dict[int, int], cid: str | None, n: int, pieces: list, blob=None,
                 gone_ok: bool = False) -> int:
    """place() for pieces in areas no longer registered (unregister_spans): written with
    process_vm_writev, faulted in as the host's THP mode says (huge pages in gpusnap's
    window: cuda/hugepages.py). A zero chunk is left alone: an untouched page of a fresh
    anonymous area reads as zeros."""
    if cid is None:
        return 0
    base = _decoded(repo, cid, n, blob)
    for pid, vaddr, off, length in pieces:
        vm_write(pid, vaddr, base + off, length)
    return sum(p[3] for p in pieces)


def _decoded(repo, cid: str, n: int, blob=None) -> int:
    """The address of chunk cid decoded (verified) in this worker's scratch buffer, valid
    until its next decode; a remote store's cache keeps the chunk."""
    blob = repo.read_blob(cid) if blob is None else blob
    view, _blob = repo.decode_chunk(blob, cid, n, check="frame")
    return uffd.address_of(view.obj)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = None


def vm_write(pid: int, dst: int, src: int, length: int) -> None:
    """length bytes at src (this process) to dst in pid (process_vm_writev, until all are
    written); OSError if the kernel refuses (EFAULT: not mapped there)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.process_vm_writev.restype = ctypes.c_ssize_t
    done = 0
    while done < length:
        local = _IoVec(src + done, length - done)
        remote = _IoVec(dst + done, length - done)
        got = _libc.process_vm_writev(ctypes.c_int(pid), ctypes.byref(local), ctypes.c_ulong(1),
                                      ctypes.byref(remote), ctypes.c_ulong(1), ctypes.c_ulong(0))
        if got <= 0:
            err = ctypes.get_errno() or errno.EFAULT
            raise OSError(err, f"process_vm_writev of {length - done} bytes at {dst + done:#x} "
                               f"in pid {pid}: {os.strerror(err)}")
        done += got


def unregister_spans(fds: dict[int, int], spans: dict[int, list[tuple[int, int]]]) \
        -> dict[int, list[tuple[int, int]]]:
    """Take spans (pid -> [start, end) ranges, page-aligned) out of each pid's
    userfaultfd; returns those that were (a span the kernel refuses stays with the uffd
    fill). The caller writes every page of them before the tree runs (place_direct)."""
    out: dict[int, list[tuple[int, int]]] = {}
    for pid, ranges in spans.items():
        fd = fds.get(pid)
        for start, end in ranges:
            if fd is None or start % uffd.PAGE_SIZE or end % uffd.PAGE_SIZE or end <= start:
                continue
            try:
                uffd.unregister(fd, start, end - start)
            except OSError:
                continue
            out.setdefault(pid, []).append((start, end))
    return out


def place(repo, fds: dict[int, int], cid: str | None, n: int, pieces: list, blob=None,
          gone_ok: bool = False) -> int:
    """Decode one chunk (verified; blob: its stored bytes where read already) and place
    its pieces; a zero chunk as the zero page. Pages already present were placed by the
    guard for a fault: left as they are. A remote store's cache keeps the chunk.
    gone_ok: an area unmapped meanwhile is skipped (uffd.copy)."""
    if cid is None:
        for pid, vaddr, _off, length in pieces:
            uffd.zeropage(fds[pid], vaddr, length, gone_ok=gone_ok)
        return 0
    base = _decoded(repo, cid, n, blob)
    for pid, vaddr, off, length in pieces:
        uffd.copy(fds[pid], vaddr, base + off, length, gone_ok=gone_ok)
    return sum(p[3] for p in pieces)


# ---- the guard -----------------------------------------------------------------------------

class Guard:
    """The process that takes CRIU's lazy-pages connection, serves the faults of the tasks
    while CRIU restores them, and guards the restored tree (module docstring)."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock
        self.fds: dict[int, int] = {}
        self.pids: list[int] = []
        self._relay_done = False

    @classmethod
    def start(cls, work: str, repo, items: list[tuple],
              late: dict[int, list[tuple[int, int]]] | None = None) -> "Guard":
        """Fork the guard (before CRIU restore starts, and before any thread does).
        repo and items (fill_items) let it place a page a task faults on at once. late:
        the ranges filled while the tree already runs (late())."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ours, theirs = socket.socketpair()
        try:
            listener.bind(os.path.join(work, SOCKET_NAME))
            listener.listen(1)
            pid = sysrun.fork_helper(_guard_main, listener, theirs, ours, repo, items, late or {})
        finally:
            listener.close()
            theirs.close()
        return cls(pid, ours)

    def receive(self, expected: int, timeout: float = 60.0, alive=None) -> dict[int, int]:
        """The descriptors of the expected number of live tasks (pid -> fd), as CRIU
        hands them over; CRIU restore is still running (it waits on its tasks' faults).
        alive() (asked every half second while none comes) says whether CRIU still runs."""
        self.sock.settimeout(0.5 if alive else timeout)
        deadline = time.monotonic() + timeout
        while len(self.fds) < expected:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.sock, _PID.size, 1)
            except socket.timeout:
                if alive and not alive():
                    raise CriuFailed(f"CRIU exited after handing over {len(self.fds)} of "
                                     f"{expected} userfaultfds") from None
                if time.monotonic() < deadline:
                    continue
                raise CriuFailed(f"CRIU handed over {len(self.fds)} of {expected} "
                                 f"userfaultfds in {timeout:.0f} s") from None
            if len(msg) != _PID.size:
                raise CriuFailed("the lazy-pages guard went away during CRIU restore")
            (pid,) = _PID.unpack(msg)
            if pid == _END:
                raise CriuFailed(f"CRIU handed over {len(self.fds)} of {expected} userfaultfds")
            self.pids.append(abs(pid))
            if pid > 0:
                if not fds:
                    raise CriuFailed(f"no userfaultfd came for restored pid {pid}")
                self.fds[pid] = fds[0]
        return self.fds

    def late(self) -> None:
        """Every page outside the late ranges is in and CRIU restore has returned; the tree
        is about to be continued while the late ranges (the driver's staging memory) are
        filled. From here the guard serves a fault outside them as a page the task
        dropped since (the zero page), and notes a fork or a change to the map within
        them, which release() then refuses."""
        self._relayed()
        self.sock.sendall(LATE)
        if self.sock.recv(1) != LATE_ACK:
            raise CriuFailed("the lazy-pages guard went away before the tree was continued")

    def release(self) -> None:
        """Every page is in and CRIU restore has returned: close our descriptors, have
        the guard close its own."""
        self._close_fds()
        self._relayed()
        self.sock.sendall(FILLED)
        answer = self.sock.recv(1)
        if answer == CHANGED:
            raise CriuFailed("the restored tree forked or changed the memory map of the "
                             "driver's staging memory while gpusnap filled it",
                             hint="restore again without GPUSNAP_UFFD_OVERLAP=1 (every page "
                                  "is then in before the tree runs)")
        if answer != FILLED_ACK:
            raise CriuFailed("the lazy-pages guard went away before it released the pages")

    def _relayed(self) -> None:
        """What the guard relayed after the last descriptor, up to its end mark (once)."""
        if self._relay_done:
            return
        self.sock.settimeout(10.0)
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, _PID.size, 1)
            for fd in fds:
                os.close(fd)
            if len(msg) != _PID.size:
                raise CriuFailed("the lazy-pages guard went away before it released the pages")
            if _PID.unpack(msg)[0] == _END:
                break
        self._relay_done = True

    def close(self, done: bool) -> None:
        """done: the restore succeeded and was reported; else the guard kills the tree."""
        self._close_fds()
        try:
            if done:
                self.sock.sendall(DONE)
        except OSError:
            pass
        self.sock.close()
        sysrun.reap(self.pid, 10.0)

    def _close_fds(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class _GuardState:
    """The guard's loop (in the guard process): CRIU's connection, the tasks'
    descriptors and gpusnap's socket, on one selector."""

    def __init__(self, gpusnap: socket.socket, repo, items: list[tuple],
                 late: dict[int, list[tuple[int, int]]] | None = None):
        self.gpusnap = gpusnap
        self.repo = repo
        self.index = _FaultIndex(items)
        self.late = late or {}
        self.late_phase = False
        self.changed: list[tuple[int, int, int, int]] = []     # (pid, event, start, end)
        self.sel = selectors.DefaultSelector()
        self.sel.register(gpusnap, selectors.EVENT_READ, self._word)
        self.uffds: dict[int, int] = {}          # fd -> pid
        self.pids: list[int] = []
        self.done = False

    def run(self, listener: socket.socket) -> None:
        self.sel.register(listener, selectors.EVENT_READ, self._accept)
        while not self.done:
            for key, _ in self.sel.select():
                key.data(key.fileobj)

    def _accept(self, listener) -> None:
        conn, _ = listener.accept()
        self.sel.unregister(listener)
        listener.close()
        self.sel.register(conn, selectors.EVENT_READ, self._handoff)

    def _handoff(self, conn) -> None:
        got = uffd.next_handoff(conn)
        if got is None:                          # CRIU finished, or went away
            self.sel.unregister(conn)
            conn.close()
            socket.send_fds(self.gpusnap, [_PID.pack(_END)], [])
            return
        pid, fd = got
        self.pids.append(pid)
        socket.send_fds(self.gpusnap, [_PID.pack(pid if fd is not None else -pid)],
                        [fd] if fd is not None else [])
        if fd is not None:
            self.uffds[fd] = pid
            self.sel.register(fd, selectors.EVENT_READ, self._faults)

    def _faults(self, fd) -> None:
        """A task faulted while CRIU restores it (its restorer touches its stack, TLS,
        rseq area): the chunk piece that holds the page is placed now (the fill then
        finds it present), a page that held nothing at the dump is mapped as zeros."""
        pid = self.uffds[fd]
        faults, changes = uffd.read_events(fd)
        if self.late_phase:
            self.changed += [(pid, *c) for c in changes if late_change(self.late, pid, *c)]
        for address in faults:
            piece = self.index.find(pid, address)
            if piece is None or (self.late_phase and
                                 not staging.contains(self.late, pid, address, address + 1)):
                uffd.zeropage(fd, address & ~(PAGE - 1), PAGE, gone_ok=self.late_phase)
            else:
                place(self.repo, {pid: fd}, *piece, gone_ok=self.late_phase)

    def _word(self, sock) -> None:
        word = sock.recv(1)
        if word == LATE:
            self.late_phase = True
            sock.sendall(LATE_ACK)
            return
        if word == FILLED:
            for fd in list(self.uffds):     # what came before the last copy: read first
                self._faults(fd)
            for fd in list(self.uffds):
                self.sel.unregister(fd)
                os.close(fd)
            self.uffds.clear()
            sock.sendall(CHANGED if self.changed else FILLED_ACK)
            return
        if word != DONE:                         # gpusnap went away
            _kill(self.pids)
        self.done = True


PAGE = 4096


class _FaultIndex:
    """pid -> its lazy pieces sorted by address, to find the one a fault falls in."""

    def __init__(self, items: list[tuple]):
        by_pid: dict[int, list] = {}
        for cid, n, pieces in items:
            for piece in pieces:
                by_pid.setdefault(piece[0], []).append((piece[1], piece[1] + piece[3], cid, n, piece))
        self.by_pid = {pid: sorted(v) for pid, v in by_pid.items()}
        self.starts = {pid: [v[0] for v in vs] for pid, vs in self.by_pid.items()}

    def find(self, pid: int, address: int):
        """(cid, n, [piece]) for the piece holding address, or None."""
        starts = self.starts.get(pid, [])
        i = bisect.bisect_right(starts, address) - 1
        if i < 0:
            return None
        start, end, cid, n, piece = self.by_pid[pid][i]
        return (cid, n, [piece]) if address < end else None


def late_change(late: dict[int, list[tuple[int, int]]], pid: int, event: int, start: int,
                end: int) -> bool:
    """Whether a change to pid's memory map, seen while the late ranges are filled, may
    leave a page of them unfilled or filled wrongly: a fork (the child's copy of an
    unfilled page would read zeros), a remap (its unfilled pages move where no fill goes)
    or a remove (a page dropped there must read zeros, not what the fill places next)
    that meets a late range. An unmap does neither: what is gone cannot be read, and the
    fill skips it (uffd.copy's gone_ok)."""
    if event == uffd.EVENT_FORK:
        return True
    return event in (uffd.EVENT_REMAP, uffd.EVENT_REMOVE) and staging.contains(late, pid, start, end)


def _guard_main(listener: socket.socket, gpusnap: socket.socket, gpusnap_end: socket.socket,
                repo, items, late) -> None:
    gpusnap_end.close()         # gpusnap's end: its close (or death) must reach us as EOF
    state = _GuardState(gpusnap, repo, items, late)
    try:
        state.run(listener)
    except BaseException:   # noqa: BLE001 - whatever went wrong, the tree must not live on
        _kill(state.pids)
        raise


def _kill(pids: list[int]) -> None:
    """The restored tasks, stopped and never continued: SIGKILL, before any copy of
    their descriptors closes (the guard's close when it exits)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
