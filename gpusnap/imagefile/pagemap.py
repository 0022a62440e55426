"""CRIU pagemap images: which virtual pages a pages-N.img holds, and where.

    PAGEMAP_IMAGE ::= COMMON_MAGIC PAGEMAP_MAGIC HEAD { PAGEMAP_ENTRY }
    HEAD          ::= pagemap_head   { 1: pages_id u32 }          -> pages-<pages_id>.img
    PAGEMAP_ENTRY ::= pagemap_entry  { 1: vaddr u64, 2: nr_pages u32 (0 since CRIU 4),
                                       3: in_parent bool (old images), 4: flags u32,
                                       5: pages_nr u64 (CRIU >= 4: the page count) }
    flags: PE_PARENT=1 (pages live in a parent image), PE_LAZY=2, PE_PRESENT=4

An entry's pages are in the pages image iff it is present: flags & PE_PRESENT when
flags is set, else not in_parent. Present entries' pages follow each other in entry
order, PAGE_SIZE bytes a page, so an entry's file offset is the sum of the present
pages before it. Files: pagemap-<pid>.img and pagemap-shmem-<ino>.img.

Writing (zero_pages.py splits entries): an entry is re-encoded field by field in
CRIU's order, 1 vaddr, 2 nr_pages, 3 in_parent, 4 flags, 5 pages_nr, with the fields the
original carried; the page count goes where the original had it (5 if present, else 2;
CRIU >= 4 writes nr_pages=0 next to pages_nr). Entries with other fields are not rewritten.
"""

from __future__ import annotations

import bisect
import glob
import os
from dataclasses import dataclass
from typing import BinaryIO

from . import image
from .protobuf import decode_fields, encode_varint_field

PAGE_SIZE = 4096
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4


@dataclass(frozen=True)
class PagemapEntry:
    vaddr: int
    nr_pages: int
    flags: int | None
    in_parent: bool

    @property
    def present(self) -> bool:
        if self.flags is not None:
            return bool(self.flags & PE_PRESENT)
        return not self.in_parent


def parse(f: BinaryIO) -> tuple[int, list[PagemapEntry]]:
    """(pages_id, entries) of one pagemap image."""
    if image.read_magic(f) != image.PAGEMAP_MAGIC:
        raise ValueError("not a pagemap image")
    it = image.entries(f)
    head = decode_fields(next(it, b""))
    pages_id = int(head.get(1, 0))
    return pages_id, [_entry(decode_fields(payload)) for payload in it]


@dataclass(frozen=True)
class RawPagemap:
    """A pagemap image as read: header bytes, head payload, each entry's payload and fields."""
    magic: bytes
    head: bytes
    payloads: list[bytes]
    fields: list[dict]

    @property
    def pages_id(self) -> int:
        return int(decode_fields(self.head).get(1, 0))

    @property
    def entries(self) -> list[PagemapEntry]:
        return [_entry(f) for f in self.fields]


_KNOWN_FIELDS = {1, 2, 3, 4, 5}


def read_raw(f: BinaryIO) -> RawPagemap:
    """A pagemap image with enough kept to write it back (see write())."""
    start = f.tell()
    if image.read_magic(f) != image.PAGEMAP_MAGIC:
        raise ValueError("not a pagemap image")
    end = f.tell()
    f.seek(start)
    magic = f.read(end - start)
    it = image.entries(f)
    head = next(it, None)
    if head is None:
        raise ValueError("pagemap image has no head")
    payloads, fields = [], []
    for payload in it:
        d = decode_fields(payload)
        if set(d) - _KNOWN_FIELDS or any(not isinstance(v, int) for v in d.values()):
            raise ValueError(f"pagemap entry with fields this writer does not know: {sorted(d)}")
        payloads.append(payload)
        fields.append(d)
    return RawPagemap(magic=magic, head=head, payloads=payloads, fields=fields)


def encode_entry(template: dict, vaddr: int, nr_pages: int) -> bytes:
    """An entry like template (its flags, its encoding) for nr_pages pages at vaddr."""
    out = encode_varint_field(1, vaddr)
    out += encode_varint_field(2, 0 if 5 in template else nr_pages)
    if 3 in template:
        out += encode_varint_field(3, template[3])
    if 4 in template:
        out += encode_varint_field(4, template[4])
    if 5 in template:
        out += encode_varint_field(5, nr_pages)
    return out


def write(f: BinaryIO, raw: RawPagemap, payloads: list[bytes]) -> None:
    """raw's header and head, then the given entry payloads."""
    f.write(raw.magic)
    image.write_entries(f, [raw.head, *payloads])


def _entry(fields: dict) -> PagemapEntry:
    return PagemapEntry(vaddr=int(fields.get(1, 0)), nr_pages=int(fields.get(5) or fields.get(2, 0)),
                        flags=int(fields[4]) if 4 in fields else None,
                        in_parent=bool(fields.get(3, 0)))


def present_offsets(entries: list[PagemapEntry]) -> list[tuple[PagemapEntry, int]]:
    """(entry, offset in the pages image) for every present entry."""
    out, off = [], 0
    for e in entries:
        if e.present:
            out.append((e, off))
            off += e.nr_pages * PAGE_SIZE
    return out


def region_offsets_for_pages(pages_path: str) -> list[int]:
    """File offsets in pages_path where a run of contiguous memory begins.

    CRIU cuts its pagemap entries every 256 pages by address, whatever the content;
    entries that continue each other in memory are merged here, so that a region's
    boundaries are where its memory really starts (or a hole, or an elided zero run)."""
    directory = os.path.dirname(pages_path)
    wanted = int(os.path.basename(pages_path)[len("pages-"):-len(".img")])
    for pm in glob.glob(os.path.join(directory, "pagemap-*.img")):
        with open(pm, "rb") as f:
            pages_id, entries = parse(f)
        if pages_id == wanted:
            starts, next_vaddr = [], None
            for e, off in present_offsets(entries):
                if e.vaddr != next_vaddr:
                    starts.append(off)
                next_vaddr = e.vaddr + e.nr_pages * PAGE_SIZE
            return starts
    return []


def cut(start: int, end: int, areas: list[tuple[int, int, bool]], starts: list[int]):
    """[start, end) cut at the edges of areas (sorted (lo, hi, flag), not overlapping;
    starts: their lo): (piece_start, piece_end, the area's flag, or False outside every
    area). zero_pages.py cuts entries at private anonymous ranges, lazy.py at VMAs."""
    pos = start
    i = max(0, bisect.bisect_right(starts, start) - 1)
    while pos < end:
        while i < len(areas) and areas[i][1] <= pos:
            i += 1
        if i < len(areas) and areas[i][0] <= pos:
            piece_end = min(end, areas[i][1])
            yield pos, piece_end, areas[i][2]
        else:
            piece_end = min(end, areas[i][0]) if i < len(areas) else end
            yield pos, piece_end, False
        pos = piece_end
