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

One pipe per thread, each piece at most a pipe's size, so a piece's splice seldom waits for
its reader (pages the socket holds in parts take more of a pipe's slots), and where it does
the reader already runs: a piece's read is handed out before its splice. A pipe is used
again only after its last piece was read. Small pieces are read by the receiver itself (a
splice and a hand-over cost more than their copy).
GPUSNAP_STREAM_COPIERS sets the threads (0: the receiver copies everything itself).
"""

from __future__ import annotations

import fcntl
import os
from concurrent.futures import Future, ThreadPoolExecutor

from .. import interrupts
from ..criu.pageserver import CUT_MID_ENTRY
from ..errors import CriuFailed

DEFAULT_THREADS = 4
MAX_THREADS = 32                # a pipe (two descriptors) each: H200, 8 were no faster than 4
PIPE_BYTES = 1 << 20            # /proc/sys/fs/pipe-max-size's default: anyone may size a pipe so
SMALL = 64 << 10                # below this a piece is read by the receiver


def threads() -> int:
    """GPUSNAP_STREAM_COPIERS where it is a count >= 0 (at most MAX_THREADS), else
    DEFAULT_THREADS (at most the CPUs less one)."""
    raw = os.environ.get("GPUSNAP_STREAM_COPIERS", "")
    if raw.strip().isdigit():
        return min(int(raw), MAX_THREADS)
    return max(0, min(DEFAULT_THREADS, (os.cpu_count() or 1) - 1))


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
        self.pending: list[Future | None] = [None] * n
        self.turn = 0
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="gpusnap-copy")

    def copy(self, fill, view: memoryview) -> None:
        """view's bytes, the next of the stream: read by a thread of this copier (in pieces
        of at most a pipe's size), or here when there are few."""
        if len(view) < SMALL:
            fill(view)
            return
        off = 0
        while off < len(view):
            i = self.turn
            self.turn = (i + 1) % self.n
            self._settle(i)
            piece = view[off:off + self.piece]
            r, w = self.pipes[i]
            self.pending[i] = self.pool.submit(_read_exactly, r, piece)
            fill.splice(w, len(piece))
            off += len(piece)

    def wait(self) -> None:
        for i in range(self.n):
            self._settle(i)

    def close(self) -> None:
        """The threads end and the pipes close; again: nothing. A reader still waiting on
        its pipe (the stream broke mid-piece) sees the pipe's end and fails (its error is
        dropped: the stream's own is the one that counts). Ctrl-C and SIGTERM wait for the
        end of it (a few reads at most): a thread left reading a pipe whose write end this
        process still held would never end, nor would the process at exit."""
        with interrupts.held():
            pipes, self.pipes = self.pipes, []
            for _r, w in pipes:
                os.close(w)
            self.pool.shutdown(wait=True)
            for r, _w in pipes:
                os.close(r)

    def _settle(self, i: int) -> None:
        future, self.pending[i] = self.pending[i], None
        if future is not None:
            future.result()

    def _close_pipes(self) -> None:
        for r, w in self.pipes:
            os.close(r)
            os.close(w)
        self.pipes = []


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
