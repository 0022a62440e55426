"""A dump's pages from CRIU's page stream straight into the store: no pages image on disk.

criu/pageserver.py reads each entry's pages into the slots of a shared buffer this
module hands out (a PageSink). A slot holds consecutive pages of one pagemap; when it is
full (or the pagemap ends) a worker process (parallel.Stream) takes it, finds its zero
pages, cuts the rest where the chunker cuts a pages image (region starts, content-defined
page boundaries: chunker.py) and stores each chunk; the slot is free again when its
result is back. So CRIU, chunking, hashing, compression and writing run at the same
time, and no zero-page pass reads the images afterwards.

finish() (CRIU has exited, so its mm images are there) writes the pagemap images into
the images dir, zero runs inside private anonymous memory dropped (imagefile/streamed.py),
and returns the pages images as file entries for the manifest.

A full slot is cut where the chunker may cut (a content-defined page boundary) and the
rest carried into the next slot, so the chunks of memory that moved between two dumps
(the CUDA driver lays its host copy out anew each time) are the same chunks.

Full slots wait in a queue of this process while every worker is busy, so CRIU is held up
only when no slot is free. A dump with --leave-running lets its stream grow (grow()) once
the driver's checkpoint has taken its host memory: up to a quarter of the memory then
available to gpusnap (BUFFER_SHARE, at most BUFFER_CAP; the caller says how much, from
hostmem.py), so that CRIU, and with it the original's freeze, ends at the pace of memory
rather than of the disk, and the original's CUDA restore runs while the workers write
the rest.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import CriuFailed, ImageError
from ..imagefile import mm, streamed, zero_pages
from ..imagefile.pagemap import PAGE_SIZE
from ..model import FileEntry
from ..model.manifest import ZERO_ID
from . import chunker, codec, parallel, pipecopy
from .tally import Tally

SLOT_BYTES = 16 << 20
MAX_SLOTS = 256                 # 4 GiB of slots at most (GPUSNAP_STREAM_SLOTS)
BUFFER_CAP = 32 << 30           # what a stream may grow to (grow(): --leave-running)
BUFFER_SHARE = 4                # ... a quarter of the memory available to gpusnap, at most


def slot_count(workers: int) -> int:
    """Slots of one page stream: GPUSNAP_STREAM_SLOTS where it is a count (2 .. MAX_SLOTS),
    else 1.5 per worker + 2. More slots let CRIU run ahead of workers that wait on the
    disk (a first dump's new chunks), at SLOT_BYTES of host memory each."""
    raw = os.environ.get("GPUSNAP_STREAM_SLOTS", "")
    if raw.isdigit():
        return max(2, min(MAX_SLOTS, int(raw)))
    return workers * 3 // 2 + 2


def slots_forced() -> bool:
    """Whether GPUSNAP_STREAM_SLOTS fixes the slot count (no growing then)."""
    return os.environ.get("GPUSNAP_STREAM_SLOTS", "").isdigit()


NICE_ENV = "GPUSNAP_STREAM_NICE"              # the workers' niceness, 0 .. 19
NICE = 0


def worker_nice() -> int:
    """The niceness the page stream's workers take: GPUSNAP_STREAM_NICE where it is a
    count (at most 19), else NICE. Niced workers leave a CPU to CRIU and the receiver of
    its pages whenever they compete for one (CRIU's stage is the original's freeze) and
    take every CPU left idle."""
    raw = os.environ.get(NICE_ENV, "").strip()
    return min(19, int(raw)) if raw.isdigit() else NICE


PREFAULT_ENV = "GPUSNAP_STREAM_PREFAULT"      # 1: slots are touched ahead (prefault()); off by default
PRIVATE_ENV = "GPUSNAP_STREAM_PRIVATE"        # 0: shared slots; 1: private; unset: private if it grows
_MADV_POPULATE_WRITE = 23                      # Linux 5.14
_CAP_SYS_PTRACE = 19
_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t


def private_wanted(grows: bool) -> bool:
    """Whether the slots go in private huge-page memory that the workers read with
    process_vm_readv (_Remote) rather than in shared memory. GPUSNAP_STREAM_PRIVATE=0: no;
    =1: wherever a forked worker may read this process's memory (workers_may_read());
    unset (the default): there, for a stream that grows (grows: a --leave-running dump's,
    whose CRIU runs ahead into hundreds of fresh slots). PageStream still tries one read
    before the dump and falls back to shared slots if it fails (an LSM that forbids it).

    Why: fresh shared memory faults in 4 KiB pages (shmem THP is `never` on most hosts):
    on an H200 four threads copied into fresh shared slots at 5.6 GB/s against 17.8 into
    private huge pages, and 8.6 GB of shared slots took 0.54 s to give back against 0.02
    (benchmarks/results/slot_fault_probe_h200_s24.md). In an 8B server's first dump, CRIU's
    stage took 4.62 s against 5.79 and the dump 18.32 s against 20.56 (medians of 3, same
    run; seed_dump_h200_8b_s25_private.md). The price: each worker copies its slot once
    more, into a buffer of its own that it reuses; a stream that does not grow reuses its
    few slots, touched after the first round, and only pays it (the 2-core CPU VM's
    1 GiB dump: 1.85-2.20 s against 1.78-1.87, cpu_paths_cpu_s25.md), so it keeps shared ones."""
    setting = private_setting()
    if setting == "0" or (setting != "1" and not grows):
        return False
    return workers_may_read()


def private_setting() -> str:
    """GPUSNAP_STREAM_PRIVATE as given: "0", "1", or "" (unset: the default)."""
    return os.environ.get(PRIVATE_ENV, "").strip()


def workers_may_read(yama: str = "/proc/sys/kernel/yama/ptrace_scope",
                     status: str = "/proc/self/status") -> bool:
    """Whether a process forked from this one may read this one's memory
    (process_vm_readv takes PTRACE_MODE_ATTACH): always without Yama or with its scope 0
    (same credentials); with scope 1 or 2 only holding CAP_SYS_PTRACE (a child is not a
    descendant of its parent); never with scope 3."""
    try:
        with open(yama) as f:
            scope = int(f.read().strip() or 0)
    except (OSError, ValueError):
        scope = 0
    if scope == 0:
        return True
    if scope >= 3:
        return False
    try:
        with open(status) as f:
            caps = next((line.split()[1] for line in f if line.startswith("CapEff:")), "0")
        return bool(int(caps, 16) >> _CAP_SYS_PTRACE & 1)
    except (OSError, ValueError, IndexError):
        return False


def buffer_slots(memory: int) -> int:
    """The slots a stream may grow to where `memory` bytes of host memory are available:
    BUFFER_SHARE of it, at most BUFFER_CAP."""
    return min(BUFFER_CAP, memory // BUFFER_SHARE) // SLOT_BYTES


@dataclass
class _Pagemap:
    pages_id: int
    entries: list[tuple[int, int, int]] = field(default_factory=list)
    pieces: dict[int, list] = field(default_factory=dict)       # slot sequence -> its pieces
    slots: int = 0
    zeros: bool = False                 # a piece is a run of zero pages


class PageStream:
    """The PageSink of one dump (criu/pageserver.py): open(), add(), close(); then
    finish() or, on any failure, abort()."""

    def __init__(self, repo, workers: int | None = None, room: int = 0):
        """room: host memory (bytes) that grow() may later take slots from (the stream's
        mapping is sized for buffer_slots(room); nothing is touched until used)."""
        self.repo = repo
        n = workers or parallel.stream_workers(codec.compresses(repo.compress_level))
        slots = slot_count(n)
        self.limit = slots if slots_forced() else max(slots, buffer_slots(room))
        self.private = private_wanted(grows=self.limit > slots)
        memory = self._map(slots)
        self.free = list(range(slots))
        self.slots = self.peak = slots                       # slots in use: made, at most
        self.ahead: Prefault | None = None                   # slots touched ahead (prefault())
        self.backlog: deque = deque()                        # full slots no worker has room for
        self.maps: dict[tuple[str, int], _Pagemap] = {}
        self.key: tuple[str, int] | None = None
        self.slot: list | None = None                        # [slot, bytes used, parts]
        self.tally = Tally()
        self.workers = n
        # where the time went: seconds the receiver spent reading CRIU's pages and waiting
        # for a free slot or worker; worker-seconds finding zero pages, cutting, hashing and
        # compressing (with the store's lookups), writing and fsyncing
        self.clock = _Clock(("recv", "copy_wait", "slot_wait", "w_zero", "w_cut", "w_chunk", "w_write"))
        # when new bytes landed (CLOCK_MONOTONIC, the workers' too): the first slot sent,
        # CRIU's end (close()), each slot's (end, new bytes); timings() says how much of
        # the writing was left once CRIU was done
        self.first_sent: float | None = None
        self.closed_at: float | None = None
        self.landed: list[tuple[float, int]] = []
        repo.backend.refresh("chunks/")                      # one listing, before the fork
        # a worker holds up to depth slots: every slot can be in a worker's queue
        def workers(memory):
            return parallel.Stream(_slot_work, (repo, memory), n, depth=max(2, -(-slots // n)),
                                   nice=worker_nice())
        self.pool = workers(memory)
        if self.private and not self._workers_read():       # shared slots then
            self.private = False
            memory = self._map(slots)
            self.pool = workers(memory)
        self.copiers = pipecopy.threads()   # after the fork: the workers hold no pipe of it
        try:
            self.copier = pipecopy.PipeCopier(self.copiers) if self.copiers else None
        except BaseException:
            self.pool.close()
            self._release()
            raise
        # how an entry's pages reach a slot: by the copier's threads, or read here
        self.receive = self.copier.copy if self.copier else (lambda fill, view: fill(view))

    def _map(self, slots: int):
        """The slots' mapping (self.shm, seen through self.view), sized for self.limit
        where the host lets it be; returns what the workers are to read it as: the mapping
        itself (shared), or a _Remote (private to this process, in huge pages)."""
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0) if self.private else mmap.MAP_SHARED
        try:
            self.shm = mmap.mmap(-1, self.limit * SLOT_BYTES, flags=flags)
        except OSError:             # a host that commits memory strictly: no room to grow
            self.limit = slots
            self.shm = mmap.mmap(-1, slots * SLOT_BYTES, flags=flags)
        self.view = memoryview(self.shm)
        if not self.private:
            return self.shm
        self.shm.madvise(mmap.MADV_HUGEPAGE)
        probe = ctypes.c_char.from_buffer(self.shm)
        address = ctypes.addressof(probe)
        del probe                                   # no export left: close() works
        return _Remote(os.getpid(), address)

    def _workers_read(self) -> bool:
        """One worker reads a page of the private slots (an untouched page reads as zeros,
        so nothing is allocated), before any of CRIU's pages are in a slot. Where it may
        not (an LSM's rule, a lost capability): the workers are stopped, the slots given
        back, and False."""
        try:
            self.pool.submit(("probe",), (0, PAGE_SIZE, []))
            while not self.pool.take(block=True):
                pass
            return True
        except BaseException as exc:
            self.pool.close()
            self._release()
            if isinstance(exc, ImageError):
                return False
            raise

    def grow(self, available: int) -> int:
        """More slots, up to buffer_slots(available) and the mapping's size: called once
        the memory the dump itself takes (the driver's checkpoint) is taken. Slots touched
        ahead (prefault()) are the stream's already and count as available to it. Returns
        the slot count."""
        if self.ahead is not None:
            available += self.ahead.touched
        more = min(self.limit, buffer_slots(available)) - self.slots
        if more > 0:        # used last (pop() is LIFO), in ascending order (prefault())
            self.free[:0] = range(self.slots + more - 1, self.slots - 1, -1)
            self.slots += more
        return self.slots

    def prefault(self, nbytes: int, available: int, threads: int = 4) -> "Prefault | None":
        """The slots grow() would hand out first for nbytes of pages (the target's device
        memory, which the driver's checkpoint is about to copy to the host), touched on
        threads of their own until stopped, so that the kernel allocates and zeroes them
        while the caller waits for the driver rather than while CRIU's pages are copied
        in. As many as grow() will allow once the driver's copy has taken its nbytes out
        of `available` (the host memory now left to gpusnap), so the driver's checkpoint
        never finds less memory than it would without. None unless GPUSNAP_STREAM_PREFAULT
        is 1, or where nothing is to be touched.

        Off by default: it shortens the original's hold but lengthens the dump (an 8B
        server's first dump held 12.1 s against 14.3, and took 22.4 s against 20.0: every
        slot touched is given back at the end, used or not; seed_dump_h200_8b_s22_prefault.md)."""
        if os.environ.get(PREFAULT_ENV, "").strip() != "1" or self.view is None:
            return None
        first = self.slots
        allowed = min(self.limit, buffer_slots(max(0, available - nbytes)))
        count = min(allowed - first, -(-nbytes // SLOT_BYTES))
        if count <= 0:
            return None
        probe = ctypes.c_char.from_buffer(self.shm)
        address = ctypes.addressof(probe)
        del probe                                       # no export left: close() works
        self.ahead = Prefault(address, first, count, threads)
        return self.ahead

    # ---- PageSink ----
    def open(self, kind: str, ident: int) -> None:
        self._submit()
        key = (kind, ident)
        if key in self.maps:
            raise CriuFailed(f"CRIU's page stream opened the {kind} pagemap {ident} twice")
        self.maps[key] = _Pagemap(pages_id=len(self.maps) + 1)
        self.key = key

    def add(self, kind: str, ident: int, vaddr: int, nr_pages: int, flags: int, fill) -> None:
        if (kind, ident) != self.key:
            raise CriuFailed(f"CRIU's page stream sent pages of the {kind} pagemap {ident} "
                             f"without opening it")
        self.maps[self.key].entries.append((vaddr, nr_pages, flags))
        left = nr_pages * PAGE_SIZE if fill else 0
        while left:
            if self.slot is None:
                self.slot = [self._free_slot(), 0, []]
            slot, used, parts = self.slot
            n = min(left, SLOT_BYTES - used)
            base = slot * SLOT_BYTES + used
            self.clock.timed("recv", self.receive, fill, self.view[base:base + n])
            parts.append((vaddr, n // PAGE_SIZE))
            self.slot[1] = used + n
            vaddr += n
            left -= n
            if self.slot[1] == SLOT_BYTES:
                self._submit(carry=True)

    def close(self) -> None:
        self._submit()
        self.closed_at = time.monotonic()

    # ---- the end ----
    def finish(self, images_dir: str, elide: bool = True) -> tuple[list[FileEntry], dict, zero_pages.Stats]:
        """Wait for the workers; write the pagemap images into images_dir. Returns the
        pages images' file entries, the byte counts, and what zero elision dropped
        (elide=False: zero pages stay, as zero chunks that take no space)."""
        self._submit()
        while self.backlog:                 # the workers take the rest as they finish
            self.pool.submit(*self.backlog.popleft())
        ranges: dict[int, list[tuple[int, int]]] = {}
        if elide:       # the mm images: while the workers store the last slots, then the rest
            self._read_ranges(images_dir, ranges)
        self._end_copier()
        self._take_results(self.pool.finish())
        if elide:
            self._read_ranges(images_dir, ranges)
        files, total = [], zero_pages.Stats()
        for (kind, ident), pm in sorted(self.maps.items()):
            entry, stats = self._write_pagemap(images_dir, kind, ident, pm,
                                               ranges.get(ident, []) if kind == "pid" else [])
            files.append(entry)
            total.add(stats)
        self._release()
        logical = sum(f.size for f in files)
        return files, {"bytes_logical": logical, "bytes_stored": self.tally.stored,
                       "bytes_new": self.tally.new}, total

    def timings(self) -> dict[str, float]:
        """Where the stream's time went (seconds; w_*: summed over the workers), and the
        number of workers: what a dump's --json reports as stream_*."""
        out = {f"stream_{k}": round(v, 4) for k, v in self.clock.seconds.items()}
        out["stream_workers"] = self.workers
        out["stream_copiers"] = self.copiers
        out["stream_slots"] = self.slots
        out["stream_slots_peak"] = self.peak
        out["stream_private"] = int(self.private)
        out["stream_nice"] = self.pool.nice if self.pool.pool is None else 0
        out.update(self._landing())
        return out

    def _landing(self) -> dict[str, float]:
        """New bytes stored by CRIU's end and after it: stream_close_s (seconds from the
        first slot sent to CRIU's end), stream_new_gb_at_close (GB of new chunks stored by
        then), stream_end_s (to the last slot stored). Nothing where no slot was sent."""
        if self.first_sent is None or self.closed_at is None or not self.landed:
            return {}
        at_close = sum(n for t, n in self.landed if t <= self.closed_at)
        return {"stream_close_s": round(self.closed_at - self.first_sent, 4),
                "stream_new_gb_at_close": round(at_close / 1e9, 3),
                "stream_end_s": round(max(t for t, _n in self.landed) - self.first_sent, 4)}

    def abort(self) -> None:
        """Stop the copier and the workers (chunks they stored stay, unreferenced, for gc)."""
        self._end_copier()
        self.backlog.clear()
        self.pool.close()
        self._release()

    def _end_copier(self) -> None:
        copier, self.copier = self.copier, None
        if copier is not None:
            copier.close()

    def _read_ranges(self, images_dir: str, ranges: dict) -> None:
        """Where each task's zero pages may go (its mm image), for the tasks that have
        zero pages (a pagemap without any needs none: the image of an LLM server's tree
        holds thousands of VMAs) and no ranges yet."""
        for (kind, ident), pm in self.maps.items():
            if kind == "pid" and pm.zeros and ident not in ranges:
                ranges[ident] = _anon_private(images_dir, ident)

    def _write_pagemap(self, images_dir: str, kind: str, ident: int, pm: _Pagemap,
                       ranges: list[tuple[int, int]]):
        """ranges: where zero pages may be dropped ([]: nowhere)."""
        pieces = [streamed.Piece(v, n, cid) for seq in range(pm.slots) for v, n, cid in pm.pieces[seq]]
        try:
            payloads, chunks, stats = streamed.assemble(pm.entries, pieces, ranges, ZERO_ID)
        except ValueError as exc:
            raise ImageError(f"CRIU's page stream for the {kind} pagemap {ident}: {exc}") from None
        name = f"pagemap-{ident}.img" if kind == "pid" else f"pagemap-shmem-{ident}.img"
        path = os.path.join(images_dir, name)
        with open(path, "xb") as f:
            f.write(streamed.pagemap_image(pm.pages_id, payloads))
        size = sum(n for _cid, n in chunks)
        return FileEntry(f"pages-{pm.pages_id}.img", size, 0o644, chunks), stats

    # ---- slots ----
    def _free_slot(self) -> int:
        self._absorb(self.pool.take())
        if not self.free:
            self.clock.timed("slot_wait", self._wait_for_slot)
        slot = self.free.pop()
        self.peak = max(self.peak, self.slots - len(self.free))
        return slot

    def _wait_for_slot(self) -> None:
        while not self.free:
            self._absorb(self.pool.take(block=True))

    def _dispatch(self) -> None:
        """Queued slots to the workers that have room."""
        while self.backlog and self.pool.has_room():
            self.pool.submit(*self.backlog.popleft())

    def _submit(self, carry: bool = False) -> None:
        """The slot being filled goes to a worker. carry (a full slot, the pagemap goes
        on): it is cut where the chunker would cut (_carry_from) and what follows the cut
        starts the next slot, so that chunks do not depend on where slots begin."""
        if self.slot is None:
            return
        if self.copier is not None:         # the slot's last pieces may still be landing
            self.clock.timed("copy_wait", self.copier.wait)
        slot, used, parts = self.slot
        tail: list = []
        cut = _carry_from(self.view[slot * SLOT_BYTES:slot * SLOT_BYTES + used]) if carry else used
        if cut < used:
            parts, tail = _split_parts(parts, cut // PAGE_SIZE)
        self.slot = None
        pm = self.maps[self.key]
        self.backlog.append(((self.key, pm.slots, slot), (slot, cut, parts)))
        if self.first_sent is None:
            self.first_sent = time.monotonic()
        self._dispatch()
        pm.slots += 1
        if tail:
            new = self._free_slot()
            src, dst = slot * SLOT_BYTES, new * SLOT_BYTES
            self.view[dst:dst + used - cut] = self.view[src + cut:src + used]
            self.slot = [new, used - cut, tail]

    def _absorb(self, results) -> None:
        """Finished slots back to the free list (their pieces kept); queued slots then go
        to the workers that finished them."""
        self._take_results(results)
        self._dispatch()

    def _take_results(self, results) -> None:
        for (key, seq, slot), (pieces, seconds, done_at) in results:
            self.free.append(slot)
            self.clock.add(seconds)
            self.landed.append((done_at, sum(p[4] for p in pieces)))
            pm = self.maps[key]
            pm.pieces[seq] = [(v, n, cid) for v, n, cid, _s, _new in pieces]
            for _v, _n, cid, size, new in pieces:
                if cid != ZERO_ID:
                    self.tally.add(cid, size, new)
                else:
                    pm.zeros = True

    def _release(self) -> None:
        if self.view is None:
            return
        self.view.release()
        self.view = None
        try:
            self.shm.close()
        except BufferError:         # a slice still held by an unwinding frame: unmapped with it
            pass


def _anon_private(images_dir: str, ident: int) -> list[tuple[int, int]]:
    """Where task ident's zero pages may be dropped; [] (keep them) without its mm image."""
    try:
        with open(os.path.join(images_dir, f"mm-{ident}.img"), "rb") as f:
            return mm.anon_private_ranges(mm.parse(f))
    except (OSError, ValueError):
        return []


def _carry_from(view: memoryview) -> int:
    """Where a full slot is cut: before the last page in its last MAX_PAGES pages that the
    chunker may start a chunk with (chunker.page_cut_candidates), at least MIN_PAGES in;
    the slot's end where there is none."""
    pages = len(view) // PAGE_SIZE
    first = max(chunker.MIN_PAGES, pages - chunker.MAX_PAGES)
    candidates = chunker.page_cut_candidates(chunker.page_heads(view[first * PAGE_SIZE:]))
    return (first + candidates[-1]) * PAGE_SIZE if candidates and first + candidates[-1] > 0 else len(view)


def _split_parts(parts: list[tuple[int, int]], at: int):
    """parts ((vaddr, pages), in slot order) cut at page `at` of the slot: (before, after)."""
    before, after, pos = [], [], 0
    for vaddr, pages in parts:
        if pos + pages <= at:
            before.append((vaddr, pages))
        elif pos >= at:
            after.append((vaddr, pages))
        else:
            k = at - pos
            before.append((vaddr, k))
            after.append((vaddr + k * PAGE_SIZE, pages - k))
        pos += pages
    return before, after


# ---- in a worker ----

def _slot_work(job, task) -> tuple[list[tuple[int, int, str, int, int]], dict[str, float], float]:
    """One slot: (vaddr, pages, chunk id or ZERO_ID, stored bytes, new bytes) per piece,
    the seconds each step took, and when it was done (time.monotonic())."""
    repo, memory = job
    slot, used, parts = task
    pending = {} if repo.backend.batches_puts else None
    clock = _Clock()
    if isinstance(memory, _Remote):
        view = clock.timed("w_read", memory.read, slot * SLOT_BYTES, used)
    else:
        view = memoryview(memory)[slot * SLOT_BYTES:slot * SLOT_BYTES + used]
    pieces, off = [], 0
    for vaddr, pages in _regions(parts):
        region = view[off:off + pages * PAGE_SIZE]
        runs = clock.timed("w_zero", lambda r: list(zero_pages.page_runs(r)), region)
        for start, count, zero in runs:
            at = vaddr + start * PAGE_SIZE
            if zero:
                pieces.append((at, count, ZERO_ID, 0, 0))
                continue
            run = region[start * PAGE_SIZE:(start + count) * PAGE_SIZE]
            for c_off, c_len in clock.timed("w_cut", chunker.run_spans, run):
                cid, stored, new = clock.timed("w_chunk", repo._put_chunk,
                                               run[c_off:c_off + c_len], pending)
                pieces.append((at + c_off, c_len // PAGE_SIZE, cid, stored, new))
        off += pages * PAGE_SIZE
    if pending:
        left = clock.timed("w_write", repo.backend.put_many, list(pending.items()))
        pieces = repo.not_new(pieces, left)
    return pieces, clock.seconds, time.monotonic()


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Remote:
    """The stream's slots as a worker sees them when they are private to the stream's
    process (private_wanted()): read with process_vm_readv into a buffer of the worker's
    own, reused from slot to slot (what read() returns is valid until its next call)."""

    def __init__(self, pid: int, address: int):
        self.pid, self.address = pid, address
        self._buffer: bytearray | None = None       # made in the worker, on its first read

    def read(self, offset: int, size: int) -> memoryview:
        if self._buffer is None or len(self._buffer) < size:
            self._buffer = bytearray(max(size, SLOT_BYTES))
        base = ctypes.addressof((ctypes.c_char * len(self._buffer)).from_buffer(self._buffer))
        got = 0
        while got < size:
            local = _iovec(base + got, size - got)
            remote = _iovec(self.address + offset + got, size - got)
            n = _libc.process_vm_readv(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
            if n <= 0:
                err = ctypes.get_errno() if n < 0 else 0
                raise ImageError(f"a page-stream worker could not read the stream's slots "
                                 f"(process_vm_readv: {os.strerror(err) if err else 'nothing read'})",
                                 hint=f"set {PRIVATE_ENV}=0")
            got += n
        return memoryview(self._buffer)[:size]


class Prefault:
    """Threads that touch slots [first, first + count) in ascending order
    (MADV_POPULATE_WRITE, which allocates without copying anything) until done or
    stopped; ctypes lets go of the GIL for each call."""

    def __init__(self, address: int, first: int, count: int, threads: int):
        self.address, self.first, self.count = address, first, count
        self.touched = 0
        self.started = time.perf_counter()
        self.seconds = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i, threads), daemon=True,
                                          name="gpusnap-prefault") for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, index: int, stride: int) -> None:
        for slot in range(self.first + index, self.first + self.count, stride):
            if self._stop.is_set():
                return
            at = ctypes.c_void_p(self.address + slot * SLOT_BYTES)
            if _libc.madvise(at, ctypes.c_size_t(SLOT_BYTES), _MADV_POPULATE_WRITE) != 0:
                return                                  # an older kernel: nothing to gain
            with self._lock:
                self.touched += SLOT_BYTES

    def stop(self) -> dict[str, float]:
        """Stop (each thread finishes the slot it is on); what was touched, for timings."""
        self._stop.set()
        for t in self._threads:
            t.join()
        self.seconds = time.perf_counter() - self.started
        return {"stream_prefault_gb": round(self.touched / 1e9, 3),
                "stream_prefault_s": round(self.seconds, 4)}


class _Clock:
    """Seconds per step, summed (names: steps reported even where they took none)."""

    def __init__(self, names: tuple[str, ...] = ()):
        self.seconds: dict[str, float] = dict.fromkeys(names, 0.0)

    def add(self, seconds: dict[str, float]) -> None:
        for name, s in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + s

    def timed(self, name: str, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


def _regions(parts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts that continue each other in memory, merged: (vaddr, pages)."""
    out: list[list[int]] = []
    for vaddr, pages in parts:
        if out and out[-1][0] + out[-1][1] * PAGE_SIZE == vaddr:
            out[-1][1] += pages
        else:
            out.append([vaddr, pages])
    return [(v, n) for v, n in out]
