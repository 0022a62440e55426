"""Zero-page elision: drop all-zero pages of private anonymous memory from CRIU's images.

    IMAGES   ::= { mm-<pid>.img pagemap-<pid>.img pages-<pages_id>.img } ...
    rewrite  :   PAGEMAP, PAGES, VMAS -> PAGEMAP', PAGES'
      PAGES' = PAGES without every page that is all zero AND lies in a VMA of VMAS that is
               plain private anonymous (mm.Vma.anon_private) AND belongs to a present
               entry; kept pages stay in order
      PAGEMAP' = PAGEMAP with each present entry split around the dropped runs (same
               flags, same encoding); entries that are not present are copied as they are

Why it is safe: CRIU restores private anonymous memory into a fresh MAP_ANONYMOUS area
and copies in only the pages the pagemap lists, so a page left out reads as zero (CRIU
itself already leaves out pages mapped to the kernel's zero page). For an area a child
inherited copy-on-write from its parent, CRIU MADV_DONTNEEDs every inherited page the
child's pagemap does not list, so it reads as zero too. A private *file* mapping is
different: a page left out would read the file, so those areas are never touched, nor
are shared, shmem (pagemap-shmem-*.img), vDSO/vvar, AIO, SysV IPC or plugin areas.

Runs shorter than min_run pages are kept (each dropped run costs a pagemap entry and,
through the region-anchored chunker, a chunk boundary); min_run=1 drops every zero page.

The pages image is compacted in place (kept pages only ever move towards the start, and
each is read before anything is written over it), then truncated; the pagemap is written
to a new file object. An image pair this module does not fully understand is left alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import ImageError
from . import mm, pagemap
from .pagemap import PAGE_SIZE

SCAN_BYTES = 1 << 20                  # pages are read and classified this many bytes at a time
MIN_RUN_PAGES = 1
_ZERO_CHUNK = bytes(SCAN_BYTES)
_ZERO_PAGE = bytes(PAGE_SIZE)
_QWORDS_PER_PAGE = PAGE_SIZE // 8


@dataclass
class Stats:
    files: int = 0                    # pagemap/pages pairs rewritten
    pages_scanned: int = 0            # pages inside private anonymous areas that were looked at
    pages_dropped: int = 0
    entries_before: int = 0
    entries_after: int = 0
    skipped: list[str] = field(default_factory=list)   # pairs left alone, and why

    @property
    def bytes_dropped(self) -> int:
        return self.pages_dropped * PAGE_SIZE

    def add(self, other: "Stats") -> None:
        self.files += other.files
        self.pages_scanned += other.pages_scanned
        self.pages_dropped += other.pages_dropped
        self.entries_before += other.entries_before
        self.entries_after += other.entries_after
        self.skipped += other.skipped

    def to_dict(self) -> dict:
        return {"files": self.files, "pages_scanned": self.pages_scanned,
                "pages_dropped": self.pages_dropped, "bytes_dropped": self.bytes_dropped,
                "entries_before": self.entries_before, "entries_after": self.entries_after,
                "skipped": list(self.skipped)}


def zero_pages_in(buf, length: int) -> list[int]:
    """Indexes of the all-zero pages in buf[:length] (length a multiple of PAGE_SIZE,
    at most SCAN_BYTES).

    A wholly zero buffer is one memcmp; otherwise only pages whose first and last 8 bytes
    are zero are compared in full, so nonzero data costs one strided read per page.
    """
    view = memoryview(buf)[:length]
    if _ZERO_CHUNK.startswith(view):                  # one memcmp, no copy (length <= SCAN_BYTES)
        return list(range(length // PAGE_SIZE))
    qwords = view.cast("Q")
    heads = qwords[::_QWORDS_PER_PAGE].tolist()
    tails = qwords[_QWORDS_PER_PAGE - 1::_QWORDS_PER_PAGE].tolist()
    out = []
    for i, (h, t) in enumerate(zip(heads, tails)):
        if h == 0 and t == 0 and _ZERO_PAGE.startswith(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]):
            out.append(i)
    return out


class _Compactor:
    """Moves kept pages of one pages image towards its start; tracks the pagemap' entries."""

    def __init__(self, pages: BinaryIO, min_run: int):
        self.f = pages
        self.min_run = max(1, min_run)
        self.w = 0                       # where the next kept byte goes
        self.payloads: list[bytes] = []
        self.template: dict = {}
        self.cur_vaddr: int | None = None
        self.cur_pages = 0
        self.zero_vaddr = self.zero_src = self.zero_pages = 0
        self.dropped = 0

    # -- output entries --
    def _extend(self, vaddr: int, pages: int) -> None:
        if self.cur_vaddr is None:
            self.cur_vaddr = vaddr
        self.cur_pages += pages

    def close_entry(self) -> None:
        if self.cur_vaddr is not None and self.cur_pages:
            self.payloads.append(pagemap.encode_entry(self.template, self.cur_vaddr, self.cur_pages))
        self.cur_vaddr, self.cur_pages = None, 0

    # -- data --
    def _put(self, data, src: int) -> None:
        if src != self.w:
            self.f.seek(self.w)
            view = memoryview(data)
            while view:
                view = view[self.f.write(view):]
        self.w += len(data)

    def keep(self, vaddr: int, data, src: int) -> None:
        self.settle_zeros()
        self._extend(vaddr, len(data) // PAGE_SIZE)
        self._put(data, src)

    def zero(self, vaddr: int, src: int, pages: int) -> None:
        """More zero pages; a run is decided (dropped or kept) when it ends."""
        if not self.zero_pages:
            self.zero_vaddr, self.zero_src = vaddr, src
        self.zero_pages += pages

    def settle_zeros(self) -> None:
        n = self.zero_pages
        if not n:
            return
        self.zero_pages = 0
        if n >= self.min_run:
            self.close_entry()
            self.dropped += n
            return
        self._extend(self.zero_vaddr, n)
        if self.zero_src != self.w:
            self._put(bytes(n * PAGE_SIZE), self.zero_src)
        else:
            self.w += n * PAGE_SIZE


def elide_pair(raw: pagemap.RawPagemap, ranges: list[tuple[int, int]], pages: BinaryIO,
               pages_size: int, *, min_run: int = MIN_RUN_PAGES) -> tuple[list[bytes], int, Stats]:
    """Compact pages (a read-write file object) in place.

    ranges: sorted [start, end) addresses where zero pages may go (mm.anon_private_ranges).
    Returns (pagemap' entry payloads, new size of the pages image, stats); the caller
    truncates the pages image to that size and writes the payloads with pagemap.write().
    """
    entries = raw.entries
    check_pair(raw, pages_size)
    stats = Stats(files=1, entries_before=len(entries))
    c = _Compactor(pages, min_run)
    areas = [(lo, hi, True) for lo, hi in ranges]
    starts = [r[0] for r in ranges]
    buf = bytearray(SCAN_BYTES)
    view = memoryview(buf)
    src = 0
    for payload, fields, e in zip(raw.payloads, raw.fields, entries):
        c.close_entry()
        if not e.present:
            c.payloads.append(payload)
            continue
        c.template = fields
        for seg_start, seg_end, eligible in pagemap.cut(e.vaddr, e.vaddr + e.nr_pages * PAGE_SIZE,
                                                        areas, starts):
            vaddr = seg_start
            while vaddr < seg_end:
                n = min(SCAN_BYTES, seg_end - vaddr)
                _read_exact(pages, src, view[:n])
                if eligible:
                    stats.pages_scanned += n // PAGE_SIZE
                    _classify(c, buf, n, vaddr, src)
                else:
                    c.keep(vaddr, view[:n], src)
                vaddr += n
                src += n
        c.settle_zeros()
    c.close_entry()
    stats.pages_dropped = c.dropped
    stats.entries_after = len(c.payloads)
    return c.payloads, c.w, stats


def check_pair(raw: pagemap.RawPagemap, pages_size: int) -> None:
    """ValueError unless the pagemap's present pages add up to the pages image's size."""
    need = sum(e.nr_pages for e in raw.entries if e.present) * PAGE_SIZE
    if need != pages_size:
        raise ValueError(f"pagemap lists {need} bytes of pages, the pages image has {pages_size}")


def _read_exact(f: BinaryIO, offset: int, view: memoryview) -> None:
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ValueError("pages image is shorter than its pagemap says")
        got += n


def _classify(c: _Compactor, buf: bytearray, n: int, vaddr: int, src: int) -> None:
    """Feed one scanned buffer to the compactor: nonzero stretches kept, zero runs counted."""
    view = memoryview(buf)[:n]
    for start, count, zero in page_runs(view):
        at, off = vaddr + start * PAGE_SIZE, src + start * PAGE_SIZE
        if zero:
            c.zero(at, off, count)
        else:
            c.keep(at, view[start * PAGE_SIZE:(start + count) * PAGE_SIZE], off)


def page_runs(view: memoryview):
    """(first page, pages, all zero?) runs covering view (whole pages, any length), in
    order; zero_pages_in() scans it SCAN_BYTES at a time."""
    pages = len(view) // PAGE_SIZE
    zero: list[int] = []
    for off in range(0, len(view), SCAN_BYTES):
        n = min(SCAN_BYTES, len(view) - off)
        zero += [off // PAGE_SIZE + i for i in zero_pages_in(view[off:off + n], n)]
    pos = 0
    for start, count in runs(zero):
        if start > pos:
            yield pos, start - pos, False
        yield start, count, True
        pos = start + count
    if pos < pages:
        yield pos, pages - pos, False


def runs(indexes: list[int]):
    """Sorted page indexes as (first, count) runs of consecutive pages."""
    start = prev = None
    for i in indexes:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            yield start, prev - start + 1
        start = prev = i
    if start is not None:
        yield start, prev - start + 1


# ---- the images directory ------------------------------------------------------------------

_PAGEMAP_NAME = re.compile(r"^pagemap-(\d+)\.img$")      # not pagemap-shmem-*: shmem is never touched


def elide(images_dir: str, *, min_run: int = MIN_RUN_PAGES) -> Stats:
    """Rewrite every pagemap-<pid>.img / pages-<id>.img pair of a CRIU dump in images_dir.

    A pair whose images can't be parsed, or whose process has no mm image, is left as
    CRIU wrote it (and named in stats.skipped). Failure after a pages image started to
    move raises: the images are then inconsistent and the dump must not be committed.
    """
    total = Stats()
    for name in sorted(os.listdir(images_dir)):
        m = _PAGEMAP_NAME.match(name)
        if not m:
            continue
        pm_path = os.path.join(images_dir, name)
        mm_path = os.path.join(images_dir, f"mm-{m.group(1)}.img")
        try:
            with open(mm_path, "rb") as f:
                ranges = mm.anon_private_ranges(mm.parse(f))
            with open(pm_path, "rb") as f:
                raw = pagemap.read_raw(f)
        except (OSError, ValueError) as exc:
            total.skipped.append(f"{name}: {exc}")
            continue
        pages_path = os.path.join(images_dir, f"pages-{raw.pages_id}.img")
        if not ranges or not os.path.exists(pages_path):
            continue
        try:
            check_pair(raw, os.path.getsize(pages_path))
        except ValueError as exc:
            total.skipped.append(f"{name}: {exc}")
            continue
        try:
            with open(pages_path, "r+b", buffering=0) as pages:
                payloads, new_size, stats = elide_pair(raw, ranges, pages, os.fstat(pages.fileno()).st_size,
                                                       min_run=min_run)
                if stats.pages_dropped:
                    tmp = pm_path + ".elide"
                    with open(tmp, "wb") as out:
                        pagemap.write(out, raw, payloads)
                    os.replace(tmp, pm_path)
                    pages.truncate(new_size)
        except (OSError, ValueError) as exc:
            raise ImageError(f"rewriting {name} and its pages image failed: {exc}") from None
        total.add(stats)
    return total
