"""The receiving end of CRIU's page-server protocol: `criu dump --page-server --ps-socket FD`
sends every page of the dump over a connected socket instead of writing pages images.

    STREAM  ::= { PSI [ PAGES ] } CLOSE
    PSI     ::= cmd u32 | pad u32 | nr_pages u64 | vaddr u64 | dst_id u64   (32 bytes, native order)
    cmd     ::= flags << 16 | command
    dst_id  ::= id << 8 | type          type 1: pagemap of task id, 2: shmem pagemap of shmid id

    OPEN2 (4)          a pagemap starts            -> reply: 1 byte, "has a parent image" (0)
    PARENT (5)         is there a parent image?    -> reply: int32 0
    ADD_F (6)          an entry: nr_pages pages at vaddr with flags; when flags has
                       PE_PRESENT, nr_pages * 4096 bytes of page data follow
    ADD (1) / HOLE (2) old forms of ADD_F (PE_PRESENT / PE_PARENT)
    CLOSE (0x1023), FORCE_CLOSE (0x1024)   every page is sent -> reply: int32 0, end

(criu/page-xfer.c, page_server_serve.) CRIU sends one task's pages after another, each
opened with OPEN2; entries of a pagemap come in address order. The data go to a sink,
which hands out the buffers the pages are read into: this module only speaks the
protocol and never holds pages itself.

CRIU is gpusnap's own child, but what it sends is checked all the same: a command this
module does not know, a type, or an entry of more pages than CRIU ever sends in one go
ends the stream with CriuFailed.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
from typing import Callable, Protocol

from ..errors import CriuFailed

PSI = struct.Struct("=I4xQQQ")
PAGE_SIZE = 4096
PE_PRESENT = 4
ADD, HOLE, OPEN, OPEN2, PARENT, ADD_F, GET = 1, 2, 3, 4, 5, 6, 7
CLOSE, FORCE_CLOSE = 0x1023, 0x1024
KINDS = {1: "pid", 2: "shmem"}
WAKE = 0.5                              # seconds of a quiet stream before CRIU is looked at
MAX_ENTRY_PAGES = 1 << 20               # 4 GiB in one entry: far beyond CRIU's pipe-sized pieces

Fill = Callable[[memoryview], None]
CRIU_GONE = "CRIU exited before its page stream was complete"
CUT_MID_ENTRY = "CRIU's page stream ended in the middle of an entry's pages"


class PageSink(Protocol):
    """Where a page stream goes: open() a pagemap, then its entries in order."""

    def open(self, kind: str, ident: int) -> None: ...

    def add(self, kind: str, ident: int, vaddr: int, nr_pages: int, flags: int,
            fill: Fill | None) -> None:
        """One entry; fill (None unless the entry is present) reads its pages, in order,
        into the views it is given: nr_pages * PAGE_SIZE bytes in all. fill.skip(n)
        passes over the next n bytes without reading them into memory (splice to
        /dev/null): for a sink that has the pages another way. fill.splice(fd, n) moves
        the next n bytes into the pipe fd (splice: the kernel passes the pages' references
        on, nothing is copied), for a sink whose own threads read them from there; it
        blocks while the pipe is full."""

    def close(self) -> None: ...


def serve(sock: socket.socket, sink: PageSink, progress: Callable[[int], None] | None = None,
          alive: Callable[[], bool] | None = None) -> None:
    """Serve one CRIU dump's page stream on sock until CRIU closes it. alive() says
    whether CRIU still runs: asked whenever the stream has been quiet for WAKE seconds,
    so a CRIU that died, while something it left behind holds its end of the socket, ends
    the stream (CriuFailed) instead of keeping gpusnap waiting forever."""
    if alive:
        sock.settimeout(WAKE)
    try:
        _serve(sock, sink, progress, alive)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise CriuFailed(f"CRIU's page stream broke ({exc.strerror})") from None


def _serve(sock: socket.socket, sink: PageSink, progress, alive) -> None:
    while True:
        head = _read_exact(sock, PSI.size, alive, allow_eof=True)
        if head is None:
            raise CriuFailed("CRIU's page stream ended before CRIU said it was complete")
        raw_cmd, nr_pages, vaddr, dst_id = PSI.unpack(head)
        cmd, flags = raw_cmd & 0xFFFF, raw_cmd >> 16
        if raw_cmd in (CLOSE, FORCE_CLOSE):
            sink.close()
            sock.sendall(struct.pack("=i", 0))
            return
        kind, ident = _decode_dst(dst_id)
        if cmd == OPEN2:
            sink.open(kind, ident)
            sock.sendall(b"\0")             # no parent image: gpusnap's dumps are whole
        elif cmd == OPEN:
            sink.open(kind, ident)
        elif cmd == PARENT:
            sock.sendall(struct.pack("=i", 0))
        elif cmd in (ADD_F, ADD, HOLE):
            flags = flags if cmd == ADD_F else (PE_PRESENT if cmd == ADD else 1)
            _add(sock, sink, kind, ident, vaddr, nr_pages, flags, alive)
            if progress and flags & PE_PRESENT:
                progress(nr_pages * PAGE_SIZE)
        else:
            raise CriuFailed(f"CRIU's page stream sent a command gpusnap does not serve ({cmd})")


def _add(sock, sink: PageSink, kind: str, ident: int, vaddr: int, nr_pages: int, flags: int,
         alive) -> None:
    if not 0 < nr_pages <= MAX_ENTRY_PAGES or vaddr % PAGE_SIZE:
        raise CriuFailed(f"CRIU's page stream sent a malformed entry ({nr_pages} pages at {vaddr:#x})")
    if not flags & PE_PRESENT:
        sink.add(kind, ident, vaddr, nr_pages, flags, None)
        return
    want = nr_pages * PAGE_SIZE
    taken = 0

    def fill(view: memoryview) -> None:
        nonlocal taken
        if taken + len(view) > want:
            raise CriuFailed("page sink asked for more bytes than the entry holds")
        _read_into(sock, view, alive)
        taken += len(view)

    def skip(n: int) -> None:
        nonlocal taken
        if taken + n > want:
            raise CriuFailed("page sink skipped more bytes than the entry holds")
        _drain(sock, n, alive)
        taken += n

    def splice(fd: int, n: int) -> None:
        nonlocal taken
        if taken + n > want:
            raise CriuFailed("page sink moved more bytes than the entry holds")
        _splice_into(sock, fd, n, alive)
        taken += n

    fill.skip = skip        # type: ignore[attr-defined]
    fill.splice = splice    # type: ignore[attr-defined]
    sink.add(kind, ident, vaddr, nr_pages, flags, fill)
    if taken != want:
        raise CriuFailed(f"page sink read {taken} of an entry's {want} bytes")


def _decode_dst(dst_id: int) -> tuple[str, int]:
    kind = KINDS.get(dst_id & 0xFF)
    if kind is None:
        raise CriuFailed(f"CRIU's page stream named a pagemap type gpusnap does not know "
                         f"({dst_id & 0xFF})")
    return kind, dst_id >> 8


def _read_into(sock: socket.socket, view: memoryview, alive=None) -> None:
    got = 0
    while got < len(view):
        n = _recv(sock, view[got:], alive)
        if n == 0:
            raise CriuFailed(CUT_MID_ENTRY)
        got += n


_DRAIN: list = []          # [pipe read end, pipe write end, /dev/null], made at first use


def _drain(sock: socket.socket, n: int, alive=None) -> None:
    """n bytes of the stream passed over: spliced into a pipe and from it to /dev/null, so
    they are never copied into this process."""
    if not _DRAIN:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)     # fewer, larger moves
        except OSError:
            pass            # above /proc/sys/fs/pipe-max-size: the default size works
        _DRAIN.extend([r, w, os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)])
    r, w, null = _DRAIN
    while n:
        got = _splice_some(sock, w, n, alive)
        left = got
        while left:
            left -= os.splice(r, null, left, flags=os.SPLICE_F_MOVE)
        n -= got


def _splice_into(sock: socket.socket, fd: int, n: int, alive=None) -> None:
    """n bytes of the stream moved into the pipe fd (its reader makes room as it goes)."""
    while n:
        n -= _splice_some(sock, fd, n, alive)


def _splice_some(sock: socket.socket, fd: int, n: int, alive=None) -> int:
    """Up to n bytes of the stream moved into the pipe fd, at least one; how many.
    Non-blocking on both ends: a quiet socket is waited on as _recv waits (a CRIU that
    exited ends it), a full pipe until its reader makes room."""
    while True:
        try:
            got = os.splice(sock.fileno(), fd, n, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            if not select.select([], [fd], [], 0)[1]:
                select.select([], [fd], [], WAKE)           # the pipe is full: its reader's turn
            elif not select.select([sock], [], [], WAKE)[0] and alive is not None and not alive():
                raise CriuFailed(CRIU_GONE) from None
            continue
        if got == 0:
            raise CriuFailed(CUT_MID_ENTRY)
        return got


def _read_exact(sock: socket.socket, n: int, alive=None, allow_eof: bool = False) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = _recv(sock, view[got:], alive)
        if k == 0:
            if allow_eof and got == 0:
                return None
            raise CriuFailed("CRIU's page stream ended in the middle of a message")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket, view: memoryview, alive) -> int:
    """recv_into view (as much as comes, at most all of it); a quiet stream whose CRIU
    has exited ends with CriuFailed."""
    while True:
        try:
            return sock.recv_into(view, len(view), socket.MSG_WAITALL)
        except TimeoutError:
            if alive is not None and not alive():
                raise CriuFailed(CRIU_GONE) from None
