"""Where chunk boundaries fall.

Page images (pages-*.img) are cut at every memory region's start (runs of contiguous
entries of the matching pagemap image: CRIU itself cuts entries every 256 pages), and
inside a region at content-defined page boundaries: a page
whose first 8 bytes hash to a value with a zero top byte starts a new chunk (one page in
256: about 1 MiB between cuts), with at least MIN_PAGES and at most MAX_PAGES pages a
chunk. A region inserted before others changes only its own chunks, and content that
moves by whole pages inside a region (the CUDA driver's host copy of device memory, laid
out anew at each checkpoint) keeps its chunks too, so dedup survives layout shifts.
Pages whose first word is zero never start a chunk (zero runs would cut at every page).

Any other file, or a page image whose pagemap can't be read, is cut every CHUNK_SIZE.
"""

from __future__ import annotations

import mmap
import os

from ..imagefile import pagemap

CHUNK_SIZE = 1 << 20
PAGE = 4096
MIN_PAGES = 64                 # 256 KiB
MAX_PAGES = 1024               # 4 MiB
_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def boundaries(path: str, size: int) -> list[tuple[int, int]]:
    """(offset, length) spans covering [0, size)."""
    if size == 0:
        return []
    name = os.path.basename(path)
    if name.startswith("pages-") and name.endswith(".img") and size % PAGE == 0:
        try:
            starts = sorted({o for o in pagemap.region_offsets_for_pages(path) if 0 <= o < size} | {0})
            return _content_defined(path, size, starts)
        except (OSError, ValueError):
            pass
    return [(off, min(CHUNK_SIZE, size - off)) for off in range(0, size, CHUNK_SIZE)]


def page_cut_candidates(words: list[int]) -> list[int]:
    """Indexes of the pages that may start a chunk, from each page's first 8 bytes."""
    return [i for i, w in enumerate(words) if w and ((w * _MIX) & _MASK) >> 56 == 0]


def _content_defined(path: str, size: int, region_starts: list[int]) -> list[tuple[int, int]]:
    with open(path, "rb") as f:
        with mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            with memoryview(mm) as whole:
                first_words = page_heads(whole)
    return spans_from_candidates(page_cut_candidates(first_words), [s // PAGE for s in region_starts],
                                 size // PAGE)


def run_spans(run: memoryview) -> list[tuple[int, int]]:
    """Where a run of whole pages (one region) is cut: (offset, length) in bytes. The
    page stream cuts each run of non-zero pages so; a seed cuts each tensor so."""
    heads = page_heads(run)
    return spans_from_candidates(page_cut_candidates(heads), [0], len(heads))


def page_heads(view: memoryview) -> list[int]:
    """The first 8 bytes of each page of view (whole pages), as integers."""
    with view.cast("Q") as words:
        return words[::PAGE // 8].tolist()


def spans_from_candidates(candidates: list[int], region_starts: list[int], pages: int) -> list[tuple[int, int]]:
    """Pure: chunk spans in bytes from candidate pages and region starts (both in pages)."""
    cuts = []
    ci = 0
    for r, start in enumerate(region_starts):
        end = region_starts[r + 1] if r + 1 < len(region_starts) else pages
        last = start
        cuts.append(start)
        while ci < len(candidates) and candidates[ci] <= start:
            ci += 1
        while ci < len(candidates) and candidates[ci] < end:
            c = candidates[ci]
            ci += 1
            while c - last > MAX_PAGES:
                last += MAX_PAGES
                cuts.append(last)
            if c - last >= MIN_PAGES:
                cuts.append(c)
                last = c
        while end - last > MAX_PAGES:
            last += MAX_PAGES
            cuts.append(last)
    cuts.append(pages)
    return [(a * PAGE, (b - a) * PAGE) for a, b in zip(cuts, cuts[1:]) if b > a]
