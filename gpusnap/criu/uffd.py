"""userfaultfd as CRIU's lazy restore hands it over: the hand-off protocol and UFFDIO_COPY.

`criu restore --lazy-pages` connects to `lazy-pages.socket` in its work dir and sends,
for each restored task, over that one connection (criu/uffd.c, send_uffd):

    HANDOFF  ::= { TASK | ZOMBIE } [ FINISHED ]
    TASK     ::= pid s32 (> 0), then the task's userfaultfd as SCM_RIGHTS
    ZOMBIE   ::= -pid s32 (a zombie has no memory: no descriptor follows)
    FINISHED ::= 0x52535446 u32 ("RSTF": restore finished)

Each userfaultfd has the task's private anonymous areas registered in MISSING mode. A
page placed with UFFDIO_COPY is the task's own; a page never placed reads as zeros once
every copy of the descriptor is closed (the kernel then unregisters the areas), which
is what the caller must prevent for pages that hold data (criu/lazy.py says how).

UFFDIO_COPY is safe for concurrent callers on one descriptor: any process holding it
(forked workers) can fill the target's memory.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import time

FINISHED = 0x52535446
# _IOWR(0xAA, 0x03, struct uffdio_copy { u64 dst, src, len, mode; s64 copy; })
UFFDIO_COPY = 0xC028AA03
_COPY = struct.Struct("=QQQQq")
# _IOWR(0xAA, 0x04, struct uffdio_zeropage { u64 start, len; u64 mode; s64 zeropage; })
UFFDIO_ZEROPAGE = 0xC020AA04
_ZEROPAGE = struct.Struct("=QQQq")
# _IOR(0xAA, 0x01, struct uffdio_range { u64 start, len; })
UFFDIO_UNREGISTER = 0x8010AA01
_RANGE = struct.Struct("=QQ")
# struct uffd_msg { u8 event; u8, u16, u32 reserved; union arg (24 bytes) }: for a page
# fault arg is { u64 flags; u64 address; u32 ptid }, for a fork { u32 ufd }, for a remap
# { u64 from, to, len }, for a remove or an unmap { u64 start, end }
_MSG = struct.Struct("=B7xQQQ")
EVENT_PAGEFAULT, EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP = 0x12, 0x13, 0x14, 0x15, 0x16


class CopyError(OSError):
    """UFFDIO_COPY refused a range (errno says why)."""


REGISTER_WAIT_S = 30.0
PAGE_SIZE = 4096


def copy(uffd: int, dst: int, src: int, length: int, gone_ok: bool = False) -> None:
    """Place length bytes at src (an address in this process) at dst in the target.

    CRIU hands the descriptor over before the task's restorer has moved its areas into
    place and registered them: until then the kernel answers ENOENT (no registered area
    there; nothing is written), and the copy is tried again, for REGISTER_WAIT_S at
    most. EAGAIN (the memory map changed meanwhile) goes on from where it stopped.
    EEXIST (a page already present: the guard placed it for a fault, from the same
    chunk) skips that page. gone_ok (the tree runs already, so every area was registered
    long ago): ENOENT means the area is gone (unmapped), and the rest is skipped."""
    done = 0
    deadline = None
    while done < length:
        arg = bytearray(_COPY.pack(dst + done, src + done, length - done, 0, 0))
        try:
            fcntl.ioctl(uffd, UFFDIO_COPY, arg, True)
            return
        except OSError as exc:
            copied = _COPY.unpack(arg)[4]
            if exc.errno == errno.EAGAIN:
                done += max(copied, 0)
                continue
            if exc.errno == errno.EEXIST:
                done += max(copied, 0) + PAGE_SIZE
                continue
            if exc.errno == errno.ENOENT and gone_ok:
                return
            if exc.errno == errno.ENOENT and _wait_registered(deadline := deadline or _deadline()):
                continue
            raise CopyError(exc.errno, f"UFFDIO_COPY of {length - done} bytes at {dst + done:#x}: "
                                       f"{exc.strerror}") from None


UNREGISTER_WAIT_S = 2.0


def unregister(uffd: int, start: int, length: int) -> None:
    """Take [start, start + length) of the target out of the descriptor: from now on a
    page missing there is an ordinary zero-filled fault, so the caller must write every
    page of it before the target runs. CRIU hands the descriptor over before the task's
    restorer has registered its areas (see copy()): EINVAL is tried again for
    UNREGISTER_WAIT_S, then raised (OSError), as is any other refusal."""
    deadline = time.monotonic() + UNREGISTER_WAIT_S
    while True:
        try:
            fcntl.ioctl(uffd, UFFDIO_UNREGISTER, _RANGE.pack(start, length))
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL or time.monotonic() > deadline:
                raise
            time.sleep(0.0005)


def _deadline() -> float:
    return time.monotonic() + REGISTER_WAIT_S


def _wait_registered(deadline: float) -> bool:
    if time.monotonic() > deadline:
        return False
    time.sleep(0.0005)
    return True


def address_of(buffer) -> int:
    """The address of a writable buffer (an mmap, a bytearray) in this process."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def next_handoff(conn: socket.socket) -> tuple[int, int | None] | None:
    """The next (pid, uffd) CRIU hands over, (pid, None) for a zombie; None once CRIU
    says the restore finished or closes the connection."""
    head = _recv_exact(conn, 4)
    if head is None:
        return None
    (value,) = struct.unpack("=i", head)
    if value & 0xFFFFFFFF == FINISHED:
        return None
    if value < 0:
        return -value, None
    _msg, fds, _flags, _addr = socket.recv_fds(conn, 1, 1)
    if not fds:
        raise ConnectionError(f"CRIU sent pid {value} without its userfaultfd")
    return value, fds[0]


def read_events(fd: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The events waiting on fd (non-blocking, as CRIU opens it), read, which lets their
    task go on: the addresses of the page faults, and the changes to the task's memory
    map: (event, start, end) of each remap (the range it moved away from), remove, unmap,
    and (EVENT_FORK, 0, 0) for a fork, whose new descriptor is closed (its child's faults
    are then not served: such a child is not one CRIU restores)."""
    faults, changes = [], []
    while True:
        try:
            data = os.read(fd, _MSG.size * 64)
        except BlockingIOError:
            return faults, changes
        if not data:
            return faults, changes
        for i in range(0, len(data) - _MSG.size + 1, _MSG.size):
            event, a, b, c = _MSG.unpack_from(data, i)
            if event == EVENT_PAGEFAULT:
                faults.append(b)
            elif event == EVENT_FORK:
                os.close(a & 0xFFFFFFFF)
                changes.append((event, 0, 0))
            elif event == EVENT_REMAP:
                changes.append((event, a, a + c))
            elif event in (EVENT_REMOVE, EVENT_UNMAP):
                changes.append((event, a, b))


def zeropage(uffd: int, start: int, length: int, gone_ok: bool = False) -> None:
    """Map the zero page over [start, start+length) in the target (EEXIST: already
    there, fine: something placed it first; gone_ok: as for copy())."""
    deadline = None
    while True:
        arg = bytearray(_ZEROPAGE.pack(start, length, 0, 0))
        try:
            fcntl.ioctl(uffd, UFFDIO_ZEROPAGE, arg, True)
            return
        except OSError as exc:
            if exc.errno == errno.EEXIST or (exc.errno == errno.ENOENT and gone_ok):
                return
            if exc.errno in (errno.ENOENT, errno.EAGAIN) and _wait_registered(deadline := deadline or _deadline()):
                continue
            raise CopyError(exc.errno, f"UFFDIO_ZEROPAGE of {length} bytes at {start:#x}: "
                                       f"{exc.strerror}") from None


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            if buf:
                raise ConnectionError("CRIU closed the lazy-pages socket mid-message")
            return None
        buf += part
    return buf
