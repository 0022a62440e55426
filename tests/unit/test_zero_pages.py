"""Zero-page elision on synthesised images: what is dropped, what is kept, byte for byte."""

from __future__ import annotations

import io
import os
import random
import struct

import pytest

from gpusnap.imagefile import image, mm, pagemap, zero_pages
from gpusnap.imagefile.protobuf import encode_varint, encode_varint_field

from test_imagefile import make_pagemap

P = pagemap.PAGE_SIZE
ANON = mm.VMA_AREA_REGULAR | mm.VMA_ANON_PRIVATE
FILE_PRIV = mm.VMA_AREA_REGULAR | mm.VMA_FILE_PRIVATE
ANON_FLAGS = mm.MAP_PRIVATE | mm.MAP_ANONYMOUS


def make_mm(vmas: list[tuple[int, int, int, int]]) -> bytes:
    """vmas: (start, end, flags, status)."""
    body = encode_varint_field(1, 0x400000)
    for start, end, flags, status in vmas:
        v = b"".join(encode_varint_field(n, x) for n, x in
                     ((1, start), (2, end), (3, 0), (4, 0), (5, 3), (6, flags), (7, status), (8, 1)))
        body += encode_varint(14 << 3 | 2) + encode_varint(len(v)) + v
    out = io.BytesIO()
    out.write(struct.pack("<II", image.IMG_COMMON_MAGIC, mm.MM_MAGIC))
    image.write_entry(out, body)
    return out.getvalue()


def page(kind: str, seed: int = 0) -> bytes:
    if kind == "z":
        return bytes(P)
    if kind == "e":                       # zero head and tail, one byte set in the middle
        b = bytearray(P)
        b[P // 2] = 7
        return bytes(b)
    return random.Random(seed).randbytes(P)


def run(pattern: str, status=ANON, flags=ANON_FLAGS, min_run=1, vaddr=0x10000):
    pages = b"".join(page(k, i) for i, k in enumerate(pattern))
    raw = pagemap.read_raw(io.BytesIO(make_pagemap(1, [(vaddr, len(pattern), pagemap.PE_PRESENT)])))
    vmas = mm.parse(io.BytesIO(make_mm([(vaddr, vaddr + len(pattern) * P, flags, status)])))
    f = io.BytesIO(pages)
    payloads, size, stats = zero_pages.elide_pair(raw, mm.anon_private_ranges(vmas), f, len(pages),
                                                  min_run=min_run)
    out = io.BytesIO()
    pagemap.write(out, raw, payloads)
    out.seek(0)
    _, entries = pagemap.parse(out)
    return pages, f.getvalue()[:size], entries, stats


def restore_like_criu(entries, data: bytes, vaddr: int, n: int) -> bytes:
    """What CRIU puts in an anonymous area: listed pages from the image, zero elsewhere."""
    mem = bytearray(n * P)
    for e, off in pagemap.present_offsets(entries):
        a = e.vaddr - vaddr
        mem[a:a + e.nr_pages * P] = data[off:off + e.nr_pages * P]
    return bytes(mem)


@pytest.mark.parametrize("pattern", ["dzzdzd", "zzzz", "dddd", "zdz", "ezdze", "d" + "z" * 300 + "d" * 260])
def test_anonymous_zero_pages_go_and_memory_reads_the_same(pattern):
    pages, data, entries, stats = run(pattern)
    assert stats.pages_dropped == pattern.count("z")
    assert len(data) == (len(pattern) - pattern.count("z")) * P
    assert restore_like_criu(entries, data, 0x10000, len(pattern)) == pages
    assert all(e.flags == pagemap.PE_PRESENT for e in entries)


def test_private_file_mapping_keeps_its_zero_pages():
    pages, data, entries, stats = run("dzzd", status=FILE_PRIV, flags=mm.MAP_PRIVATE)
    assert stats.pages_dropped == 0 and data == pages
    assert [(e.vaddr, e.nr_pages) for e in entries] == [(0x10000, 4)]


@pytest.mark.parametrize("status", [ANON | mm.VMA_AREA_VDSO, ANON | mm.VMA_EXT_PLUGIN,
                                    mm.VMA_AREA_REGULAR | mm.VMA_ANON_SHARED, ANON | mm.VMA_AREA_MEMFD])
def test_special_areas_are_never_touched(status):
    assert run("zzz", status=status)[3].pages_dropped == 0


def test_runs_shorter_than_min_run_are_kept():
    pages, data, entries, stats = run("dzdzzzzd", min_run=3)
    assert stats.pages_dropped == 4
    assert [(e.vaddr - 0x10000) // P for e in entries] == [0, 7]
    assert restore_like_criu(entries, data, 0x10000, 8) == pages


def test_entry_spanning_anon_and_file_areas_is_cut_at_the_area_edge():
    v = 0x100000
    raw = pagemap.read_raw(io.BytesIO(make_pagemap(1, [(v, 4, pagemap.PE_PRESENT | pagemap.PE_LAZY),
                                                       (v + 0x10000, 2, pagemap.PE_PARENT)])))
    vmas = mm.parse(io.BytesIO(make_mm([(v, v + 2 * P, ANON_FLAGS, ANON),
                                        (v + 2 * P, v + 4 * P, mm.MAP_PRIVATE, FILE_PRIV)])))
    pages = bytes(4 * P)
    f = io.BytesIO(pages)
    payloads, size, stats = zero_pages.elide_pair(raw, mm.anon_private_ranges(vmas), f, len(pages))
    assert stats.pages_dropped == 2 and size == 2 * P
    out = io.BytesIO()
    pagemap.write(out, raw, payloads)
    out.seek(0)
    _, entries = pagemap.parse(out)
    assert [(e.vaddr, e.nr_pages, e.flags) for e in entries] == [
        (v + 2 * P, 2, pagemap.PE_PRESENT | pagemap.PE_LAZY), (v + 0x10000, 2, pagemap.PE_PARENT)]
    assert payloads[-1] == raw.payloads[-1], "entries not present are copied byte for byte"


def test_zero_pages_in_finds_exactly_the_zero_pages():
    pats = "dzezzdze" * 40
    buf = bytearray(b"".join(page(k, i) for i, k in enumerate(pats)))
    assert zero_pages.zero_pages_in(buf, len(buf)) == [i for i, k in enumerate(pats) if k == "z"]
    assert zero_pages.zero_pages_in(bytearray(1 << 20), 1 << 20) == list(range(256))


def test_elide_dir_rewrites_process_pairs_and_leaves_shmem_alone(tmp_path):
    v = 0x7f0000000000
    (tmp_path / "mm-7.img").write_bytes(make_mm([(v, v + 4 * P, ANON_FLAGS, ANON)]))
    (tmp_path / "pagemap-7.img").write_bytes(make_pagemap(1, [(v, 4, pagemap.PE_PRESENT)]))
    (tmp_path / "pages-1.img").write_bytes(page("d") + bytes(2 * P) + page("d", 1))
    (tmp_path / "pagemap-shmem-99.img").write_bytes(make_pagemap(2, [(0, 2, pagemap.PE_PRESENT)]))
    (tmp_path / "pages-2.img").write_bytes(bytes(2 * P))
    stats = zero_pages.elide(str(tmp_path))
    assert stats.pages_dropped == 2 and stats.files == 1
    assert os.path.getsize(tmp_path / "pages-1.img") == 2 * P
    assert os.path.getsize(tmp_path / "pages-2.img") == 2 * P
    with open(tmp_path / "pagemap-7.img", "rb") as f:
        assert [(e.vaddr, e.nr_pages) for e in pagemap.parse(f)[1]] == [(v, 1), (v + 3 * P, 1)]


def test_elide_dir_skips_a_pair_it_does_not_understand(tmp_path):
    (tmp_path / "mm-7.img").write_bytes(make_mm([(0, 4 * P, ANON_FLAGS, ANON)]))
    (tmp_path / "pagemap-7.img").write_bytes(make_pagemap(1, [(0, 4, pagemap.PE_PRESENT)]))
    (tmp_path / "pages-1.img").write_bytes(bytes(3 * P))          # one page short
    stats = zero_pages.elide(str(tmp_path))
    assert stats.pages_dropped == 0 and stats.skipped
    assert os.path.getsize(tmp_path / "pages-1.img") == 3 * P
