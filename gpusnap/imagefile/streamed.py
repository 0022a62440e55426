"""Pagemap and pages images from a page stream (criu/pageserver.py), zero pages elided.

A streamed dump never has a pages image on disk. What it has, per pagemap:

    ENTRIES ::= { (vaddr, nr_pages, flags) }          as CRIU sent them, in order
    PIECES  ::= { (vaddr, nr_pages, chunk) }          the present pages in stream order, cut
                                                      into stored chunks and all-zero runs
                                                      (chunk = ZERO_ID, nothing stored)

and assemble() makes of them what zero_pages.elide() makes of a staged dump's pair:

    PAGEMAP' = ENTRIES, each present entry split around the zero runs that lie inside
               private anonymous memory (ranges, from the task's mm image)
    PAGES'   = the chunks of every other piece, in order (a zero run outside those
               ranges stays in the image: a private file page of zeros is not the file's)

Zero pages are found while the pages stream in; which of them may go is decided here,
once CRIU has written the mm images. Pure: no I/O.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from . import image, pagemap
from .pagemap import PAGE_SIZE, PE_PRESENT
from .protobuf import encode_varint, encode_varint_field
from .zero_pages import Stats


@dataclass(frozen=True)
class Piece:
    vaddr: int
    pages: int
    chunk: str                  # a chunk id, or zero_id for a run of zero pages


def assemble(entries: list[tuple[int, int, int]], pieces: list[Piece], ranges: list[tuple[int, int]],
             zero_id: str) -> tuple[list[bytes], list[tuple[str, int]], Stats]:
    """(pagemap' entry payloads, pages' chunks as (id, bytes), stats). ranges: sorted
    [start, end) where zero pages may go (mm.anon_private_ranges); [] keeps them all."""
    present = sum(n for _v, n, f in entries if f & PE_PRESENT)
    if present != sum(p.pages for p in pieces):
        raise ValueError(f"the stream's entries hold {present} pages, its pieces {sum(p.pages for p in pieces)}")
    kept, dropped = _keep(pieces, ranges, zero_id)
    stats = Stats(files=1, pages_scanned=present, pages_dropped=dropped, entries_before=len(entries))
    payloads = _split_entries(entries, _merged_runs(kept))
    stats.entries_after = len(payloads)
    chunks: list[tuple[str, int]] = []
    for _start, _end, cid in kept:
        n = (_end - _start) * PAGE_SIZE
        if chunks and cid == zero_id and chunks[-1][0] == zero_id:
            chunks[-1] = (zero_id, chunks[-1][1] + n)
        else:
            chunks.append((cid, n))
    return payloads, chunks, stats


def pagemap_image(pages_id: int, payloads: list[bytes]) -> bytes:
    """A pagemap image as CRIU writes one: magics, head {pages_id}, the entries."""
    out = io.BytesIO()
    magic = struct.pack("<II", image.IMG_COMMON_MAGIC, image.PAGEMAP_MAGIC)
    head = pagemap.RawPagemap(magic=magic, head=encode_varint_field(1, pages_id), payloads=[], fields=[])
    pagemap.write(out, head, payloads)
    return out.getvalue()


def entry_payload(vaddr: int, nr_pages: int, flags: int) -> bytes:
    """An entry in CRIU 4's encoding: vaddr, nr_pages 0, flags, pages_nr (what
    pagemap.encode_entry({1: 0, 2: 0, 4: flags, 5: 0}, vaddr, nr_pages) writes, spelt
    out: an LLM server's pagemap has thousands of entries)."""
    return b"".join((b"\x08", encode_varint(vaddr), b"\x10\x00\x20", encode_varint(flags),
                     b"\x28", encode_varint(nr_pages)))


def _keep(pieces: list[Piece], ranges: list[tuple[int, int]], zero_id: str):
    """Kept pieces as (stream start, stream end, chunk) in pages, and the pages dropped."""
    areas = [(lo, hi, True) for lo, hi in ranges]
    starts = [lo for lo, _hi in ranges]
    kept, pos, dropped = [], 0, 0
    for p in pieces:
        if p.chunk != zero_id or not areas:
            kept.append((pos, pos + p.pages, p.chunk))
        else:
            end = p.vaddr + p.pages * PAGE_SIZE
            for lo, hi, eligible in pagemap.cut(p.vaddr, end, areas, starts):
                a = pos + (lo - p.vaddr) // PAGE_SIZE
                b = pos + (hi - p.vaddr) // PAGE_SIZE
                if eligible:
                    dropped += b - a
                else:
                    kept.append((a, b, zero_id))
        pos += p.pages
    return kept, dropped


def _merged_runs(kept) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for start, end, _cid in kept:
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    return [(a, b) for a, b in runs]


def _split_entries(entries: list[tuple[int, int, int]], runs: list[tuple[int, int]]) -> list[bytes]:
    """Each present entry cut to the kept runs (stream coordinates, in pages); others as sent."""
    out, pos, r = [], 0, 0
    for vaddr, nr, flags in entries:
        if not flags & PE_PRESENT:
            out.append(entry_payload(vaddr, nr, flags))
            continue
        start, end = pos, pos + nr
        while r < len(runs) and runs[r][1] <= start:
            r += 1
        k = r
        while k < len(runs) and runs[k][0] < end:
            a, b = max(start, runs[k][0]), min(end, runs[k][1])
            out.append(entry_payload(vaddr + (a - start) * PAGE_SIZE, b - a, flags))
            k += 1
        pos = end
    return out
