"""CRIU mm images: a task's memory areas (VMAs), and which of them are private anonymous.

    MM_IMAGE  ::= COMMON_MAGIC MM_MAGIC MM_ENTRY
    MM_ENTRY  ::= mm_entry { 1..11: mm_* u64, 12: exe_file_id u32, 13: saved_auxv u64*,
                             14: vmas VMA_ENTRY* (length-delimited, repeated), 15..: ... }
    VMA_ENTRY ::= vma_entry { 1: start u64, 2: end u64, 3: pgoff u64, 4: shmid u64,
                              5: prot u32, 6: flags u32 (mmap flags), 7: status u32,
                              8: fd s64, 9: madv u64, 10: fdflags u32 }

status bits (criu/include/image.h): VMA_AREA_REGULAR=1<<0 (dumpable), STACK=1<<1,
VSYSCALL=1<<2, VDSO=1<<3, HEAP=1<<5, FILE_PRIVATE=1<<6, FILE_SHARED=1<<7,
ANON_SHARED=1<<8, ANON_PRIVATE=1<<9, SYSVIPC=1<<10, SOCKET=1<<11, VVAR=1<<12,
AIORING=1<<13, MEMFD=1<<14, SHSTK=1<<15, EXT_PLUGIN=1<<27, UNSUPP=1<<31.
Files: mm-<pid>.img, one per process (threads share their leader's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from . import image
from .protobuf import decode_fields, read_varint

MM_MAGIC = 0x57492820

VMA_AREA_REGULAR = 1 << 0
VMA_AREA_STACK = 1 << 1
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_AREA_HEAP = 1 << 5
VMA_FILE_PRIVATE = 1 << 6
VMA_FILE_SHARED = 1 << 7
VMA_ANON_SHARED = 1 << 8
VMA_ANON_PRIVATE = 1 << 9
VMA_AREA_SYSVIPC = 1 << 10
VMA_AREA_SOCKET = 1 << 11
VMA_AREA_VVAR = 1 << 12
VMA_AREA_AIORING = 1 << 13
VMA_AREA_MEMFD = 1 << 14
VMA_AREA_SHSTK = 1 << 15
VMA_EXT_PLUGIN = 1 << 27
VMA_UNSUPP = 1 << 31

MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20

# Any of these makes an area something other than plain private anonymous memory.
_NOT_PLAIN_ANON = (VMA_AREA_VSYSCALL | VMA_AREA_VDSO | VMA_FILE_PRIVATE | VMA_FILE_SHARED
                   | VMA_ANON_SHARED | VMA_AREA_SYSVIPC | VMA_AREA_SOCKET | VMA_AREA_VVAR
                   | VMA_AREA_AIORING | VMA_AREA_MEMFD | VMA_AREA_SHSTK | VMA_EXT_PLUGIN
                   | VMA_UNSUPP)


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    pgoff: int
    shmid: int
    prot: int
    flags: int
    status: int

    @property
    def anon_private(self) -> bool:
        """Plain private anonymous memory: a page CRIU does not restore reads as zero.

        Both CRIU's status and the mmap flags must agree; a private *file* mapping is
        excluded (its missing pages would read the file), and so is every special area.
        """
        return (bool(self.status & VMA_AREA_REGULAR) and bool(self.status & VMA_ANON_PRIVATE)
                and not self.status & _NOT_PLAIN_ANON
                and bool(self.flags & MAP_PRIVATE) and bool(self.flags & MAP_ANONYMOUS)
                and not self.flags & MAP_SHARED)


def parse(f: BinaryIO) -> list[Vma]:
    """The VMAs of one mm image, in the order CRIU wrote them (ascending addresses)."""
    if image.read_magic(f) != MM_MAGIC:
        raise ValueError("not an mm image")
    payload = next(image.entries(f), None)
    if payload is None:
        raise ValueError("mm image has no entry")
    return [Vma(*_vma_fields(value)) for number, value in _repeated_messages(payload)
            if number == 14]


def _vma_fields(msg: bytes) -> list[int]:
    """start, end, pgoff, shmid, prot, flags, status of one vma_entry (0 where absent).

    A process holds thousands of VMAs (an LLM server's CUDA host memory), so this reads
    the message as CRIU writes it (one-byte keys, varint values) in one loop; anything
    else goes through decode_fields, with the same result."""
    out = [0] * 8
    pos, n = 0, len(msg)
    try:
        while pos < n:
            key = msg[pos]
            if key & 0x87:                          # a longer key, or not a varint
                return _vma_fields_slow(msg)
            b = msg[pos + 1]
            pos += 2
            value, shift = b & 0x7F, 7
            while b & 0x80:
                if shift > 70:
                    raise ValueError("varint too long")
                b = msg[pos]
                pos += 1
                value |= (b & 0x7F) << shift
                shift += 7
            if key < 64:                            # fields 1-7
                out[key >> 3] = value
    except IndexError:
        raise ValueError("truncated varint") from None
    return out[1:]


def _vma_fields_slow(msg: bytes) -> list[int]:
    fields = decode_fields(msg)
    return [int(fields.get(k, 0)) for k in range(1, 8)]


def anon_private_ranges(vmas: list[Vma]) -> list[tuple[int, int]]:
    """Sorted, merged [start, end) address ranges of plain private anonymous memory."""
    out: list[tuple[int, int]] = []
    for v in sorted((v for v in vmas if v.anon_private and v.end > v.start), key=lambda v: v.start):
        if out and v.start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], v.end))
        else:
            out.append((v.start, v.end))
    return out


def _repeated_messages(msg: bytes):
    """Every (field number, bytes) of length-delimited fields, repeats included."""
    pos = 0
    while pos < len(msg):
        key, pos = read_varint(msg, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = read_varint(msg, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = read_varint(msg, pos)
            if pos + length > len(msg):
                raise ValueError("truncated field")
            yield number, msg[pos:pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
