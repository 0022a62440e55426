"""CRIU image parsing on synthesised images (the grammar in gpusnap/imagefile/pagemap.py)."""

from __future__ import annotations

import io
import os
import struct

from gpusnap.imagefile import image, pagemap
from gpusnap.imagefile.protobuf import decode_fields, encode_varint_field
from gpusnap.store import chunker


def _entry(vaddr: int, pages: int, flags: int) -> bytes:
    return encode_varint_field(1, vaddr) + encode_varint_field(2, 0) + \
        encode_varint_field(4, flags) + encode_varint_field(5, pages)


def make_pagemap(pages_id: int, entries: list[tuple[int, int, int]]) -> bytes:
    out = io.BytesIO()
    out.write(struct.pack("<II", image.IMG_COMMON_MAGIC, image.PAGEMAP_MAGIC))
    image.write_entry(out, encode_varint_field(1, pages_id))
    for e in entries:
        image.write_entry(out, _entry(*e))
    return out.getvalue()


def test_varints_roundtrip():
    for v in (0, 1, 127, 128, 300, 2**32 + 5, 2**63):
        assert decode_fields(encode_varint_field(3, v)) == {3: v}


def test_pagemap_offsets_skip_entries_not_present():
    raw = make_pagemap(7, [(0x1000, 2, pagemap.PE_PRESENT), (0x9000, 5, pagemap.PE_PARENT),
                           (0x20000, 3, pagemap.PE_PRESENT | pagemap.PE_LAZY)])
    pages_id, entries = pagemap.parse(io.BytesIO(raw))
    assert pages_id == 7
    assert [e.nr_pages for e in entries] == [2, 5, 3]
    assert [(e.vaddr, off) for e, off in pagemap.present_offsets(entries)] == [(0x1000, 0), (0x20000, 8192)]


def test_chunks_start_at_region_boundaries(tmp_path):
    big = chunker.CHUNK_SIZE // 4096 + 3           # a region a little over one chunk
    entries = [(0x1000, 1, 4), (0x100000, big, 4), (0x900000, 2, 4)]
    with open(tmp_path / "pagemap-42.img", "wb") as f:
        f.write(make_pagemap(1, entries))
    size = (1 + big + 2) * 4096
    (tmp_path / "pages-1.img").write_bytes(bytes(size))
    spans = chunker.boundaries(str(tmp_path / "pages-1.img"), size)
    starts = [o for o, _ in spans]
    assert starts[:2] == [0, 4096]
    assert (1 + big) * 4096 in starts
    assert sum(n for _, n in spans) == size


def test_region_insertion_keeps_later_chunks(tmp_path):
    """A new region before the others must not move the chunks of the regions after it."""
    def spans(entries, d):
        os.makedirs(d)
        with open(os.path.join(d, "pagemap-1.img"), "wb") as f:
            f.write(make_pagemap(1, entries))
        size = sum(e[1] for e in entries) * 4096
        open(os.path.join(d, "pages-1.img"), "wb").truncate(size)
        return chunker.boundaries(os.path.join(d, "pages-1.img"), size)
    n = chunker.CHUNK_SIZE // 4096
    before = spans([(0x10000000, 3 * n, 4)], str(tmp_path / "a"))
    after = spans([(0x1000, 5, 4), (0x10000000, 3 * n, 4)], str(tmp_path / "b"))
    assert [(o - 5 * 4096, n) for o, n in after if o >= 5 * 4096] == before


def test_content_moving_by_whole_pages_inside_a_region_keeps_its_chunks(tmp_path):
    """The CUDA driver lays out its host copy of device memory anew at each checkpoint:
    content shifted by a few pages inside one region must keep most of its chunks."""
    import random
    rnd = random.Random(7)
    body = b"".join(rnd.randbytes(4096) for _ in range(3000))

    def chunk_set(prefix_pages, d):
        os.makedirs(d)
        data = rnd.randbytes(prefix_pages * 4096) + body
        pages = len(data) // 4096
        with open(os.path.join(d, "pagemap-1.img"), "wb") as f:
            f.write(make_pagemap(1, [(0x10000000, pages, 4)]))
        with open(os.path.join(d, "pages-1.img"), "wb") as f:
            f.write(data)
        spans = chunker.boundaries(os.path.join(d, "pages-1.img"), len(data))
        assert sum(n for _, n in spans) == len(data)
        assert all(n <= chunker.MAX_PAGES * 4096 for _, n in spans)
        return {data[o:o + n] for o, n in spans}

    a = chunk_set(3, str(tmp_path / "a"))
    b = chunk_set(17, str(tmp_path / "b"))
    shared = sum(len(c) for c in a & b)
    assert shared >= 0.8 * len(body), shared / len(body)


def test_spans_respect_min_and_max():
    spans = chunker.spans_from_candidates([1, 2, 3, 100, 5000], [0], 6000)
    sizes = [n // 4096 for _, n in spans]
    assert sum(sizes) == 6000
    assert all(s <= chunker.MAX_PAGES for s in sizes)
    assert [o // 4096 for o, _ in spans][:2] == [0, 100]
