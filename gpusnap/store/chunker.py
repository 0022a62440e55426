"""Where chunk boundaries fall.

Page images (pages-*.img) are cut at every memory region's start, taken from the
matching pagemap image, and every CHUNK_SIZE inside a region. A region inserted before
others then changes only its own chunks: later regions keep their boundaries, so dedup
survives layout shifts. Any other file, or a page image whose pagemap can't be read, is
cut every CHUNK_SIZE.
"""

from __future__ import annotations

import os

from ..imagefile import pagemap

CHUNK_SIZE = 1 << 20


def boundaries(path: str, size: int) -> list[tuple[int, int]]:
    """(offset, length) spans covering [0, size)."""
    starts = _region_starts(path, size)
    spans = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else size
        off = start
        while off < end:
            n = min(CHUNK_SIZE, end - off)
            spans.append((off, n))
            off += n
    return spans


def _region_starts(path: str, size: int) -> list[int]:
    name = os.path.basename(path)
    if size == 0:
        return []
    if name.startswith("pages-") and name.endswith(".img"):
        try:
            offsets = pagemap.region_offsets_for_pages(path)
        except (OSError, ValueError):
            offsets = []
        starts = sorted({o for o in offsets if 0 <= o < size} | {0})
        return starts
    return [0]
