"""cuda/staging.py: the ranges a CUDA checkpoint adds to a process, and the fill's split
into what is placed before the tree runs and what after (GPUSNAP_UFFD_OVERLAP)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, strategies as st

from gpusnap.criu import lazy, uffd
from gpusnap.cuda import staging
from gpusnap.errors import ManifestInvalid
from gpusnap.model.fields import Fields
from gpusnap.model.manifest import CudaFacts

MIB = 1 << 20


def test_added_is_what_no_old_range_covered():
    assert staging.added([(0, 10 * MIB)], [(0, 30 * MIB), (40 * MIB, 41 * MIB)]) == \
        [(10 * MIB, 30 * MIB)]                       # merged into a neighbour; 1 MiB: too small
    assert staging.added([(0, 10 * MIB), (12 * MIB, 14 * MIB)], [(0, 30 * MIB)]) == \
        [(10 * MIB, 12 * MIB), (14 * MIB, 30 * MIB)]
    assert staging.added([(0, 10 * MIB)], [(0, 10 * MIB)]) == []


def test_anon_ranges_of_this_process_hold_a_fresh_mapping():
    import mmap
    m = mmap.mmap(-1, 8 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m[0] = 1
        address = uffd.address_of(m)
        assert any(s <= address < e for s, e in staging.anon_ranges(os.getpid()))
    finally:
        m.close()
    assert staging.anon_ranges(2 ** 22 + 12345) == []    # no such pid


pieces = st.lists(st.tuples(st.just(7), st.integers(0, 64), st.integers(1, 16)), max_size=12)
ranges = st.lists(st.tuples(st.integers(0, 80), st.integers(1, 20)), max_size=4)


@given(pieces, ranges)
def test_split_keeps_every_byte_once_and_puts_it_on_the_right_side(raw, spans):
    items = [(f"c{i}", 1 << 20, [(pid, v * 4096, i * 4096, n * 4096)])
             for i, (pid, v, n) in enumerate(raw)]
    late = {7: [(s * 4096, (s + n) * 4096) for s, n in spans]}
    early, later = staging.split_items(items, late)

    def pages(its):
        out = {}
        for cid, _n, ps in its:
            for pid, vaddr, off, length in ps:
                for k in range(0, length, 4096):
                    out.setdefault((cid, vaddr + k), []).append(off + k)
        return out
    whole, e, l_ = pages(items), pages(early), pages(later)
    assert sorted(e.keys() | l_.keys()) == sorted(whole)
    assert not (e.keys() & l_.keys())
    for key, offs in {**e, **l_}.items():
        assert offs[0] in whole[key]                 # same chunk offset as before the split
    for (_cid, addr) in l_:
        assert staging.contains(late, 7, addr, addr + 4096)
    for (_cid, addr) in e:
        assert not staging.contains(late, 7, addr, addr + 4096)


def test_no_late_ranges_leaves_the_items_as_they_are():
    items = [("a", 10, [(1, 0, 0, 4096)])]
    assert staging.split_items(items, {}) == (items, [])


def test_late_change_refuses_what_could_leave_a_late_page_wrong():
    late = {5: [(0x10000, 0x20000)]}
    assert lazy.late_change(late, 5, uffd.EVENT_FORK, 0, 0)
    assert lazy.late_change(late, 5, uffd.EVENT_REMOVE, 0x1f000, 0x30000)
    assert lazy.late_change(late, 5, uffd.EVENT_REMAP, 0x10000, 0x11000)
    assert not lazy.late_change(late, 5, uffd.EVENT_UNMAP, 0x10000, 0x20000)   # gone: skipped
    assert not lazy.late_change(late, 5, uffd.EVENT_REMOVE, 0x20000, 0x30000)  # outside
    assert not lazy.late_change(late, 6, uffd.EVENT_REMOVE, 0x10000, 0x20000)  # another pid


def test_manifest_staging_round_trips_and_is_checked():
    facts = CudaFacts.from_json(Fields({"pids": [5], "staging": {"5": [[4096, 8192]]}}, "cuda"))
    assert facts.staging_ranges() == {5: [(4096, 8192)]}
    assert CudaFacts.from_json(Fields(facts.to_json(), "cuda")) == facts
    assert "staging" not in CudaFacts(pids=[5]).to_json()
    for bad in ({"5": [[8192, 4096]]}, {"x": [[0, 4096]]}, {"5": [[1, 4096]]}, {"5": "no"},
                {"5": [[0, 4096, 1]]}, {"0": [[0, 4096]]}):
        with pytest.raises(ManifestInvalid):
            CudaFacts.from_json(Fields({"pids": [5], "staging": bad}, "cuda"))


def test_staging_thp_is_asked_for_and_auto_follows_huge_pages_and_the_host():
    from gpusnap.engine.pagepath import staging_thp_wanted
    for off in (None, "", "0", "off", "no", "false", " OFF "):
        assert not staging_thp_wanted(off, True, "madvise")        # off unless asked for
    for mode in ("madvise", "always"):
        assert staging_thp_wanted("auto", True, mode)
    assert not staging_thp_wanted("auto", True, "never")           # nothing would be huge
    assert not staging_thp_wanted("auto", True, None)              # mode unreadable
    assert not staging_thp_wanted("auto", False, "madvise")        # GPUSNAP_HUGE_PAGES=off
    assert staging_thp_wanted("1", False, "never")                 # asked for: as asked
