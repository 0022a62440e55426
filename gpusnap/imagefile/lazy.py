"""Lazy pages: which pages of a CRIU dump gpusnap places itself, through userfaultfd.

    plan(PAGEMAP, VMAS) -> LazyPlan
      PAGEMAP' = every present entry cut at VMA edges; a piece that lies in a VMA CRIU's
                 restorer registers with userfaultfd gets PE_LAZY, so `criu restore
                 --lazy-pages` skips it (criu/mem.c: restore_priv_vma_content)
      segments = (vaddr, offset in the pages image, length) of every PE_LAZY piece: what
                 gpusnap must place before the task may run
      eager    = (offset, length) ranges of the pages image CRIU still reads itself

Which VMAs: CRIU registers every private anonymous area that is not locked, vDSO or
vsyscall (vma_entry_can_be_lazy). Marked lazy here are only plain private anonymous
areas (mm.Vma.anon_private) that are not MAP_LOCKED: a subset, so every PE_LAZY page is
in a registered area. Pieces are cut at VMA edges because one UFFDIO_COPY must stay in
one VMA, and so that a page's laziness depends on its VMA alone (a parent and a child
that share an area then agree on it).

Entries that are not present (in a parent image) and entries without flags (images
older than CRIU 3.x) are copied as they are and stay eager. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import mm, pagemap
from .pagemap import PAGE_SIZE, PE_LAZY

MAP_LOCKED = 0x2000


@dataclass
class LazyPlan:
    payloads: list[bytes] = field(default_factory=list)
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    eager: list[tuple[int, int]] = field(default_factory=list)


def lazy_vma(v: mm.Vma) -> bool:
    return v.anon_private and not v.flags & MAP_LOCKED


def plan(raw: pagemap.RawPagemap, vmas: list[mm.Vma]) -> LazyPlan:
    areas = sorted(((v.start, v.end, lazy_vma(v)) for v in vmas if v.end > v.start))
    starts = [a[0] for a in areas]
    out = LazyPlan()
    off = 0
    for payload, fields, e in zip(raw.payloads, raw.fields, raw.entries):
        if not e.present:
            out.payloads.append(payload)
            continue
        length = e.nr_pages * PAGE_SIZE
        if 4 not in fields:
            out.payloads.append(payload)
            _add_range(out.eager, off, length)
            off += length
            continue
        for start, end, lazy in pagemap.cut(e.vaddr, e.vaddr + length, areas, starts):
            template = dict(fields)
            if lazy:
                template[4] = fields[4] | PE_LAZY
                out.segments.append((start, off, end - start))
            else:
                template[4] = fields[4] & ~PE_LAZY
                _add_range(out.eager, off, end - start)
            out.payloads.append(pagemap.encode_entry(template, start, (end - start) // PAGE_SIZE))
            off += end - start
    return out


def _add_range(ranges: list[tuple[int, int]], off: int, length: int) -> None:
    if ranges and ranges[-1][0] + ranges[-1][1] == off:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
    else:
        ranges.append((off, length))
