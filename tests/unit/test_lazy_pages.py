"""The uffd page path's pure parts: which pages become lazy, and which chunk holds them."""

from gpusnap.criu import lazy
from gpusnap.imagefile import lazy as lazy_plan
from gpusnap.imagefile import mm, pagemap
from gpusnap.imagefile.pagemap import PAGE_SIZE, PE_LAZY, PE_PRESENT
from gpusnap.imagefile.protobuf import decode_fields

P = PAGE_SIZE
ANON = dict(flags=mm.MAP_PRIVATE | mm.MAP_ANONYMOUS, status=mm.VMA_AREA_REGULAR | mm.VMA_ANON_PRIVATE)
FILE = dict(flags=mm.MAP_PRIVATE, status=mm.VMA_AREA_REGULAR | mm.VMA_FILE_PRIVATE)


def vma(start, end, **kind):
    return mm.Vma(start=start, end=end, pgoff=0, shmid=0, prot=3, **kind)


def raw(*entries):
    """entries: (vaddr, pages, flags)"""
    fields = [{1: v, 2: 0, 4: f, 5: n} for v, n, f in entries]
    return pagemap.RawPagemap(magic=b"", head=b"", fields=fields,
                              payloads=[pagemap.encode_entry(f, f[1], f[5]) for f in fields])


def entries(payloads):
    return [(e[1], e.get(5) or e[2], e.get(4)) for e in map(decode_fields, payloads)]


def test_an_entry_is_cut_at_vma_edges_and_only_anonymous_pieces_are_lazy():
    vmas = [vma(0x1000, 0x3000, **ANON), vma(0x3000, 0x5000, **FILE), vma(0x5000, 0x6000, **ANON)]
    plan = lazy_plan.plan(raw((0x1000, 5, PE_PRESENT)), vmas)
    assert entries(plan.payloads) == [(0x1000, 2, PE_PRESENT | PE_LAZY), (0x3000, 2, PE_PRESENT),
                                      (0x5000, 1, PE_PRESENT | PE_LAZY)]
    assert plan.segments == [(0x1000, 0, 2 * P), (0x5000, 4 * P, P)]
    assert plan.eager == [(2 * P, 2 * P)]


def test_locked_areas_and_parent_entries_stay_with_criu():
    locked = vma(0x1000, 0x2000, flags=ANON["flags"] | lazy_plan.MAP_LOCKED, status=ANON["status"])
    plan = lazy_plan.plan(raw((0x1000, 1, PE_PRESENT), (0x8000, 2, 1)), [locked, vma(0x8000, 0xa000, **ANON)])
    assert plan.segments == []
    assert entries(plan.payloads)[0] == (0x1000, 1, PE_PRESENT)
    assert entries(plan.payloads)[1] == (0x8000, 2, 1)       # in a parent image: copied as is
    assert plan.eager == [(0, P)]


def test_fill_items_map_segments_onto_chunks():
    pages = lazy.Pages(segments={"pages-1.img": [(7, 0x10000, 0, 3 * P), (7, 0x40000, 4 * P, 2 * P)]})
    chunks = [["a" * 64, 2 * P], ["zero", 2 * P], ["b" * 64, 2 * P]]
    items = lazy.fill_items(pages, {"pages-1.img": chunks}, "zero")
    assert items == [
        ("a" * 64, 2 * P, [(7, 0x10000, 0, 2 * P)]),
        (None, 2 * P, [(7, 0x12000, 0, P)]),
        ("b" * 64, 2 * P, [(7, 0x40000, 0, 2 * P)]),
    ]


def test_the_fault_index_finds_the_piece_or_nothing():
    items = [("c", 2 * P, [(7, 0x10000, 0, 2 * P)]), ("d", P, [(8, 0x10000, 0, P)])]
    index = lazy._FaultIndex(items)
    assert index.find(7, 0x11fff) == ("c", 2 * P, [(7, 0x10000, 0, 2 * P)])
    assert index.find(7, 0x12000) is None          # a hole: mapped as zeros
    assert index.find(8, 0x10000)[0] == "d"
    assert index.find(9, 0x10000) is None
