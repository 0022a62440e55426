"""A page stream's bytes copied into their buffers by a few threads instead of the one
that reads the stream.

criu/pageserver.py reads CRIU's socket in one thread; a recv copies every byte there,
and on an LLM server's dump that one copy is the receiver's whole cost. Here the
receiver only moves an entry's bytes into a pipe (fill.splice: the pages' references pass
from the socket to the pipe, nothing is copied) and a thread of this copier reads them
out of the pipe into their place: the copies of consecutive pieces run at once, on as
many CPUs as there are threads. The stream's order is kept because the receiver takes
every byte off the socket itself, in order; only where they land is done elsewhere.

    copier.copy(fill, view)   view's bytes: spliced into a free pipe, copied by its thread
    copier.wait()             every copy handed out so far has landed (or its error raised)
    copier.close()            the threads end; pipes closed (also on failure: a reader
                              blocked on a pipe sees its end)

Each thread owns a pipe and a queue: a piece (at most a pipe's size) is queued to the next
thread in turn, then spliced into its pipe, and the thread reads the pipe into the piece's
place, its queue's pieces in order. The pipe is the only flow control: the receiver waits
only where a pipe is full, never on a thread per piece (a queue's put; an H200 measured
the same stream as with a future per piece, created and waited on: dump_probe_h200_queues.md).
wait() queues a marker behind each busy thread's pieces and waits for them. Small pieces are
read by the receiver itself (a splice and a hand-over cost more than their copy).
GPUSNAP_STREAM_COPIERS sets the threads (0: the receiver copies everything itself).
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading

from .. import hostcpu, interrupts
from ..criu.pageserver import CUT_MID_ENTRY
from ..errors import CriuFailed

DEFAULT_THREADS = 4
MIN_CPUS = 4                    # fewer: a copier only takes CPU from CRIU and the workers
MAX_THREADS = 32                # a pipe (two descriptors) each: H200, 8 were no faster than 4
PIPE_BYTES = 1 << 20            # /proc/sys/fs/pipe-max-size's default: anyone may size a pipe so
SMALL = 64 << 10                # below this a piece is read by the receiver


def threads(cpus: int | None = None) -> int:
    """GPUSNAP_STREAM_COPIERS where it is a count >= 0 (at most MAX_THREADS), else
    DEFAULT_THREADS (at most the CPUs this process may use less one: hostcpu.py), none on
    fewer than MIN_CPUS CPUs: on two, CRIU, the receiver and the workers keep both busy,
    and a copier's splice and hand-over are work added (the 2-core CPU host's 1 GiB dump:
    1.33 s without, 1.39-1.44 with one; benchmarks/results/cpu_paths_cpu_s22.md)."""
    raw = os.environ.get("GPUSNAP_STREAM_COPIERS", "")
    if raw.strip().isdigit():
        return min(int(raw), MAX_THREADS)
    cpus = cpus or hostcpu.count()
    return min(DEFAULT_THREADS, cpus - 1) if cpus >= MIN_CPUS else 0


class PipeCopier:
    def __init__(self, n: int):
        self.n = n
        self.pipes: list[tuple[int, int]] = []
        self.piece = PIPE_BYTES
        try:
            for _ in range(n):
                r, w = os.pipe2(os.O_CLOEXEC)
                self.pipes.append((r, w))
                self.piece = min(self.piece, _size_pipe(w))
        except BaseException:
            self._close_pipes()
            raise
        self.queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(n)]
        self.errors: list[BaseException] = []
        self.busy: set[int] = set()         # threads handed a piece since the last wait()
        self.turn = 0
        self.threads: list[threading.Thread] = []
        try:
            for i, ((r, _w), q) in enumerate(zip(self.pipes, self.queues)):
                self.threads.append(threading.Thread(target=_copy_thread, args=(r, q, self.errors),
                                                     name=f"gpusnap-copy-{i}", daemon=True))
                self.threads[-1].start()
        except BaseException:
            self.close()
            raise

    def copy(self, fill, view: memoryview) -> None:
        """view's bytes, the next of the stream: read by a thread of this copier (in pieces
        of at most a pipe's size), or here when there are few."""
        if len(view) < SMALL:
            fill(view)
            return
        off = 0
        while off < len(view):
            if self.errors:
                raise self.errors[0]
            i = self.turn
            self.turn = (i + 1) % self.n
            piece = view[off:off + self.piece]
            self.queues[i].put(piece)       # handed out before the splice: it reads as it comes
            self.busy.add(i)
            fill.splice(self.pipes[i][1], len(piece))
            off += len(piece)

    def wait(self) -> None:
        """Every piece handed out so far has landed; a thread's error is raised."""
        marks = []
        for i in sorted(self.busy):
            mark = threading.Event()
            self.queues[i].put(mark)
            marks.append(mark)
        for mark in marks:
            mark.wait()
        self.busy.clear()
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        """The threads end and the pipes close; again: nothing. A thread still waiting on
        its pipe (the stream broke mid-piece) sees the pipe's end and fails (its error is
        dropped: the stream's own is the one that counts). Ctrl-C and SIGTERM wait for the
        end of it (a few reads at most): a thread left reading a pipe whose write end this
        process still held would never end, nor would the process at exit."""
        with interrupts.held():
            pipes, self.pipes = self.pipes, []
            if not pipes:
                return
            for _r, w in pipes:
                os.close(w)
            for q in self.queues:
                q.put(None)
            self._join()
            for r, _w in pipes:
                os.close(r)

    def _join(self) -> None:
        for t in self.threads:
            if t.ident is not None:
                t.join()

    def _close_pipes(self) -> None:
        for r, w in self.pipes:
            os.close(r)
            os.close(w)
        self.pipes = []


def _copy_thread(fd: int, pieces: queue.SimpleQueue, errors: list[BaseException]) -> None:
    """A copy thread: its queue's pieces read from its pipe, in order, until None; a marker
    (an Event) is set once every piece before it has landed."""
    while True:
        item = pieces.get()
        if item is None:
            return
        if isinstance(item, threading.Event):
            item.set()
            continue
        try:
            _read_exactly(fd, item)
        except BaseException as exc:   # noqa: BLE001 - raised by the receiver's next copy or wait
            errors.append(exc)
            _drain_until_closed(fd, pieces)
            return


def _drain_until_closed(fd: int, pieces: queue.SimpleQueue) -> None:
    """After a failed read the pipe's bytes are out of step: whatever comes is thrown away
    (so a receiver splicing into this pipe is never stuck on it) and markers are set,
    until None."""
    os.set_blocking(fd, False)
    while True:
        try:
            while os.read(fd, PIPE_BYTES):
                pass
        except OSError:
            pass
        try:
            item = pieces.get(timeout=0.05)
        except queue.Empty:
            continue
        if item is None:
            return
        if isinstance(item, threading.Event):
            item.set()


def _size_pipe(fd: int) -> int:
    """The pipe's size in bytes after asking for PIPE_BYTES (a smaller one where the
    system says no: an unprivileged user past pipe-max-size)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def _read_exactly(fd: int, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise CriuFailed(CUT_MID_ENTRY)
        got += n
