"""The streamed dump path against the staged one: CRIU's page-server protocol spoken by a
client like CRIU's (criu/page-xfer.c) into PageStream and a real store, and the result
compared page for page with what zero_pages.elide makes of the same pages images."""

from __future__ import annotations

import io
import json
import os
import pathlib
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpusnap.criu import pageserver
from gpusnap.errors import CriuFailed
from gpusnap.imagefile import mm, pagemap, streamed, zero_pages
from gpusnap.model.manifest import ZERO_ID
from gpusnap.store import Repository
from gpusnap.store import pagestream
from gpusnap.store.pagestream import PageStream

from test_imagefile import make_pagemap
from test_zero_pages import ANON, ANON_FLAGS, FILE_PRIV, make_mm, page

P = pagemap.PAGE_SIZE
HERE = pathlib.Path(__file__).resolve().parent


def send_like_criu(sock, maps: dict[int, list[tuple[int, bytes]]], split: int = 256) -> None:
    """What criu dump --page-server sends: per task OPEN2, ADD_F pieces of at most `split`
    pages, FORCE_CLOSE; reads CRIU's replies."""
    psi = pageserver.PSI
    for pid, areas in maps.items():
        dst = pid << 8 | 1
        sock.sendall(psi.pack(pageserver.OPEN2, 0, 0, dst))
        assert sock.recv(1) == b"\0"
        for vaddr, data in areas:
            for off in range(0, len(data), split * P):
                part = data[off:off + split * P]
                cmd = pagemap.PE_PRESENT << 16 | pageserver.ADD_F
                sock.sendall(psi.pack(cmd, len(part) // P, vaddr + off, dst) + part)
    sock.sendall(psi.pack(pageserver.FORCE_CLOSE, 0, 0, 0))
    assert struct.unpack("=i", sock.recv(4))[0] == 0


def stream(tmp_path, maps, vmas_of, split=256, workers=2, images="images", grow=0, out=None):
    """grow: host memory (bytes) the stream may grow into, as a --leave-running dump's;
    out: a dict that gets the stream's timings."""
    repo = Repository.open(str(tmp_path / "store"))
    images = tmp_path / images
    images.mkdir()
    for pid, vmas in vmas_of.items():
        (images / f"mm-{pid}.img").write_bytes(make_mm(vmas))
    sink = PageStream(repo, workers=workers, room=grow)
    if grow:
        sink.grow(grow)
    ours, theirs = socket.socketpair()
    client = threading.Thread(target=send_like_criu, args=(theirs, maps, split))
    client.start()
    try:
        pageserver.serve(ours, sink)
    finally:
        client.join()
        ours.close()
        theirs.close()
    files, counts, stats = sink.finish(str(images))
    if out is not None:
        out.update(sink.timings())
    return repo, images, files, counts, stats


def pages_of(repo, entry) -> bytes:
    return b"".join(repo.read_chunk(cid, n) for cid, n in entry.chunks)


def staged(pattern_pages: bytes, vaddr: int, vmas) -> tuple[list, bytes]:
    """zero_pages.elide_pair on the pages images CRIU would have written."""
    raw = pagemap.read_raw(io.BytesIO(make_pagemap(1, [(vaddr, len(pattern_pages) // P, pagemap.PE_PRESENT)])))
    ranges = mm.anon_private_ranges(mm.parse(io.BytesIO(make_mm(vmas))))
    f = io.BytesIO(pattern_pages)
    payloads, size, _ = zero_pages.elide_pair(raw, ranges, f, len(pattern_pages))
    out = io.BytesIO()
    pagemap.write(out, raw, payloads)
    out.seek(0)
    return pagemap.parse(out)[1], f.getvalue()[:size]


@pytest.mark.parametrize("pattern,status", [("dzzdzd", ANON), ("zzzz", ANON), ("ezdze", ANON),
                                            ("dzzd", FILE_PRIV), ("d" + "z" * 300 + "d" * 600, ANON)])
def test_streamed_dump_equals_the_staged_one(tmp_path, pattern, status):
    vaddr = 0x7f0000000000
    data = b"".join(page(k, i) for i, k in enumerate(pattern))
    flags = ANON_FLAGS if status == ANON else mm.MAP_PRIVATE
    vmas = [(vaddr, vaddr + len(pattern) * P, flags, status)]
    repo, images, files, counts, stats = stream(tmp_path, {42: [(vaddr, data)]}, {42: vmas}, split=100)
    want_entries, want_pages = staged(data, vaddr, vmas)
    with open(images / "pagemap-42.img", "rb") as f:
        pages_id, entries = pagemap.parse(f)
    assert [f.path for f in files] == [f"pages-{pages_id}.img"]
    got = pages_of(repo, files[0])
    # same memory once restored; CRIU's 100-page cuts stay, so compare page by page
    assert _memory(entries, got) == _memory(want_entries, want_pages)
    assert len(got) == len(want_pages) == files[0].size == counts["bytes_logical"]
    assert stats.pages_dropped == (pattern.count("z") if status == ANON else 0)


def _memory(entries, data: bytes) -> dict[int, bytes]:
    return {e.vaddr + i * P: data[off + i * P:off + (i + 1) * P]
            for e, off in pagemap.present_offsets(entries) for i in range(e.nr_pages)}


@pytest.mark.parametrize("copiers,slots", [("0", ""), ("3", ""), ("3", "40")])
def test_two_tasks_many_slots_and_dedup_on_a_second_stream(tmp_path, monkeypatch, copiers, slots):
    """With and without copy threads (pieces smaller than a slot, so a slot's last
    copies are waited for before it is cut and handed on), and with more slots than
    the workers' default depth holds (each worker then queues up to 20)."""
    monkeypatch.setenv("GPUSNAP_STREAM_COPIERS", copiers)
    monkeypatch.setenv("GPUSNAP_STREAM_SLOTS", slots)
    monkeypatch.setattr("gpusnap.store.pipecopy.SMALL", 4 * P)
    monkeypatch.setattr("gpusnap.store.pipecopy.PIPE_BYTES", 16 * P)
    monkeypatch.setattr("gpusnap.store.pagestream.SLOT_BYTES", 64 * P)
    rnd = random.Random(5)
    a = b"".join(rnd.randbytes(P) if rnd.random() < 0.7 else bytes(P) for _ in range(700))
    b = rnd.randbytes(300 * P)
    maps = {10: [(0x10000000, a), (0x20000000, b)], 11: [(0x30000000, b)]}
    vmas = {10: [(0x10000000, 0x10000000 + len(a), ANON_FLAGS, ANON)], 11: []}
    repo, images, files, counts, stats = stream(tmp_path, maps, vmas)
    assert sorted(os.listdir(images)) == ["mm-10.img", "mm-11.img", "pagemap-10.img", "pagemap-11.img"]
    with open(images / "pagemap-10.img", "rb") as f:
        pid, entries = pagemap.parse(f)
    mem = _memory(entries, pages_of(repo, next(x for x in files if x.path == f"pages-{pid}.img")))
    for i in range(700):
        want = a[i * P:(i + 1) * P]
        assert mem.get(0x10000000 + i * P, bytes(P)) == want
    assert all(mem[0x20000000 + i * P] == b[i * P:(i + 1) * P] for i in range(300))
    assert counts["bytes_new"] > 0
    # the same pages again, into the same store: nothing new (chunks dedup across dumps)
    counts2 = stream(tmp_path, maps, vmas, images="again")[3]
    assert counts2["bytes_new"] == 0 and counts2["bytes_logical"] == counts["bytes_logical"]


def test_a_grown_stream_queues_full_slots_and_stores_the_same_chunks(tmp_path, monkeypatch):
    """A --leave-running dump's stream grown past its workers' queues (one worker taking
    two slots, 24 slots of room): full slots wait in the stream's own queue, CRIU's side
    goes on, and what is stored is what the default stream stores."""
    monkeypatch.delenv("GPUSNAP_STREAM_SLOTS", raising=False)
    from gpusnap.store import pagestream
    vaddr = 0x7f0000000000
    data = random.Random(7).randbytes(5 * pagestream.SLOT_BYTES + 40 * P)     # 6 slots
    maps, vmas = {7: [(vaddr, data)]}, {7: [(vaddr, vaddr + len(data), ANON_FLAGS, ANON)]}
    timings: dict = {}
    grown = stream(tmp_path / "a", maps, vmas, workers=1, grow=24 * 4 * pagestream.SLOT_BYTES,
                   out=timings)
    plain = stream(tmp_path / "b", maps, vmas, workers=1)
    assert timings["stream_slots"] == 24 and 3 <= timings["stream_slots_peak"] <= 24, timings
    # where the writing went: new bytes by CRIU's end, never more than all of them
    assert 0 <= timings["stream_new_gb_at_close"] * 1e9 <= grown[3]["bytes_new"] + 1e6, timings
    assert 0 <= timings["stream_close_s"] and timings["stream_end_s"] >= 0, timings
    assert [f.chunks for f in grown[2]] == [f.chunks for f in plain[2]]
    assert pages_of(grown[0], grown[2][0]) == data


def test_grow_takes_a_quarter_of_the_memory_given_within_the_mapping(tmp_path, monkeypatch):
    from gpusnap.store import pagestream
    monkeypatch.delenv("GPUSNAP_STREAM_SLOTS", raising=False)
    slot = pagestream.SLOT_BYTES
    assert pagestream.buffer_slots(400 * slot) == 100
    assert pagestream.buffer_slots(1 << 50) == pagestream.BUFFER_CAP // slot
    repo = Repository.open(str(tmp_path / "store"))
    sink = PageStream(repo, workers=1, room=80 * slot)          # mapped for 20 slots
    try:
        assert sink.grow(40 * slot) == 10                       # a quarter of what is left
        assert sink.grow(8 * slot) == 10                        # never shrinks
        assert sink.grow(1 << 40) == 20                         # the mapping's size at most
        assert sorted(sink.free) == list(range(20))
    finally:
        sink.abort()
    monkeypatch.setenv("GPUSNAP_STREAM_SLOTS", "4")             # a fixed count: no growing
    sink = PageStream(repo, workers=1, room=80 * slot)
    try:
        assert sink.grow(1 << 40) == 4
    finally:
        sink.abort()


def test_prefault_touches_the_slots_grow_hands_out_first_and_stops(tmp_path, monkeypatch):
    from gpusnap.store import pagestream
    monkeypatch.delenv("GPUSNAP_STREAM_SLOTS", raising=False)
    slot = pagestream.SLOT_BYTES
    repo = Repository.open(str(tmp_path / "store"))
    sink = PageStream(repo, workers=1, room=64 * slot)              # 16 slots mapped
    try:
        for off in ("", "0", "yes"):
            monkeypatch.setenv(pagestream.PREFAULT_ENV, off)
            assert sink.prefault(6 * slot, 1 << 40) is None         # not asked for
        monkeypatch.setenv(pagestream.PREFAULT_ENV, "1")
        # what grow() allows once the driver has taken its 6 slots' worth: a quarter of
        # 42 - 6 slots = 9 slots, 3 already made: 6 to touch ahead
        for available, count in ((42, 6), (30, 3), (6, None)):     # 30 - 6: 6 slots in all
            ahead = sink.prefault(6 * slot, available * slot)
            assert (ahead and ahead.count) == count
            if ahead:
                ahead.stop()
        ahead = sink.prefault(6 * slot - 1, 1 << 40, threads=2)
        assert (ahead.first, ahead.count) == (sink.slots, 6)
        for t in ahead._threads:
            t.join()
        got = ahead.stop()
        assert got["stream_prefault_gb"] in (0, round(6 * slot / 1e9, 3))   # 0: an old kernel
        sink.grow(1 << 40)
        handed = [sink.free[-1 - i] for i in range(sink.slots)]     # pop() order
        assert handed[:3] == [2, 1, 0] and handed[3:9] == list(range(3, 9))
        assert bytes(sink.view[3 * slot:4 * slot]) == bytes(slot)   # touched, still zeros
    finally:
        sink.abort()


def test_slots_touched_ahead_count_as_the_streams_when_it_grows(tmp_path, monkeypatch):
    """The driver's copy and the touched slots both came out of what the host has left:
    grow() still hands out every slot touched ahead."""
    from gpusnap.store import pagestream
    monkeypatch.delenv("GPUSNAP_STREAM_SLOTS", raising=False)
    monkeypatch.setenv(pagestream.PREFAULT_ENV, "1")
    slot = pagestream.SLOT_BYTES
    sink = PageStream(Repository.open(str(tmp_path / "store")), workers=1, room=64 * slot)
    try:
        ahead = sink.prefault(6 * slot, 42 * slot, threads=2)     # 3 slots made, 6 ahead
        for t in ahead._threads:
            t.join()
        ahead.stop()
        if ahead.touched:                                           # 0: a kernel without it
            assert sink.grow((42 - 6 - 6) * slot) == 9              # a quarter of 36, not of 30
    finally:
        sink.abort()


@pytest.mark.parametrize("raw,want", [("", 5), ("x", 5), ("-3", 5), ("1", 2), ("64", 64), ("9999", 256)])
def test_slot_count_comes_from_gpusnap_stream_slots_within_bounds(monkeypatch, raw, want):
    from gpusnap.store.pagestream import slot_count
    monkeypatch.setenv("GPUSNAP_STREAM_SLOTS", raw)
    assert slot_count(2) == want


def test_a_stream_cut_short_is_an_error_and_abort_stops_the_workers(tmp_path):
    repo = Repository.open(str(tmp_path / "store"))
    sink = PageStream(repo, workers=2)
    ours, theirs = socket.socketpair()
    psi = pageserver.PSI
    theirs.sendall(psi.pack(pageserver.OPEN2, 0, 0, 7 << 8 | 1))
    theirs.sendall(psi.pack(pagemap.PE_PRESENT << 16 | pageserver.ADD_F, 4, 0x1000, 7 << 8 | 1) + bytes(P))
    theirs.close()
    with pytest.raises(CriuFailed, match="ended in the middle|broke"):
        pageserver.serve(ours, sink)
    sink.abort()
    assert not sink.pool.children


@pytest.mark.parametrize("head", [
    pageserver.PSI.pack(99, 0, 0, 1 << 8 | 1),                                          # unknown command
    pageserver.PSI.pack(pageserver.OPEN2, 0, 0, 1 << 8 | 9),                            # unknown type
    pageserver.PSI.pack(pagemap.PE_PRESENT << 16 | pageserver.ADD_F, 1 << 40, 0, 1 << 8 | 1),   # absurd size
    pageserver.PSI.pack(pagemap.PE_PRESENT << 16 | pageserver.ADD_F, 1, 0x1001, 1 << 8 | 1),    # unaligned
])
def test_malformed_streams_are_refused(head):
    class Sink:
        def open(self, *a): pass
        def add(self, *a): raise AssertionError("no entry may reach the sink")
        def close(self): pass
    ours, theirs = socket.socketpair()
    theirs.sendall(head)
    theirs.close()
    with pytest.raises(CriuFailed):
        pageserver.serve(ours, Sink())


def test_assemble_keeps_zero_runs_outside_private_anonymous_memory():
    pieces = [streamed.Piece(0x1000, 2, "a"), streamed.Piece(0x3000, 3, ZERO_ID), streamed.Piece(0x6000, 1, "b")]
    entries = [(0x1000, 6, pagemap.PE_PRESENT)]
    payloads, chunks, stats = streamed.assemble(entries, pieces, [(0x4000, 0x5000)], ZERO_ID)
    assert chunks == [("a", 2 * P), (ZERO_ID, 2 * P), ("b", P)]
    assert stats.pages_dropped == 1
    got = [(e.vaddr, e.nr_pages) for e in pagemap.parse(io.BytesIO(streamed.pagemap_image(1, payloads)))[1]]
    assert got == [(0x1000, 3), (0x5000, 2)]
    with pytest.raises(ValueError):
        streamed.assemble(entries, pieces[:2], [], ZERO_ID)


def test_memory_that_moved_by_whole_pages_keeps_its_chunks(tmp_path, monkeypatch):
    """Slots are cut where the chunker cuts: the same pages three pages further on (the
    CUDA driver lays its host copy out anew at each checkpoint) store almost nothing new."""
    monkeypatch.setattr("gpusnap.store.pagestream.SLOT_BYTES", 2048 * P)
    data = random.Random(9).randbytes(6000 * P)
    vaddr = 0x7f0000000000
    first = stream(tmp_path, {5: [(vaddr, data)]}, {5: []})[3]
    moved = random.Random(1).randbytes(3 * P) + data
    second = stream(tmp_path, {5: [(vaddr, moved)]}, {5: []}, images="again")[3]
    assert first["bytes_new"] > len(data) * 0.9
    assert second["bytes_new"] < len(data) * 0.1, second


def test_a_quiet_stream_whose_criu_has_exited_ends_instead_of_waiting_forever(monkeypatch):
    """Something CRIU left behind still holds its end of the socket: the stream ends once
    CRIU is found gone, mid-message or between messages."""
    class Sink:
        def open(self, *a): pass
        def add(self, kind, ident, vaddr, nr_pages, flags, fill):
            fill(memoryview(bytearray(nr_pages * P)))
        def close(self): pass
    monkeypatch.setattr(pageserver, "WAKE", 0.05)
    psi = pageserver.PSI
    for sent in (b"", psi.pack(pageserver.OPEN2, 0, 0, 7 << 8 | 1)[:10],
                 psi.pack(pagemap.PE_PRESENT << 16 | pageserver.ADD_F, 4, 0x1000, 7 << 8 | 1) + bytes(P)):
        ours, theirs = socket.socketpair()
        theirs.sendall(sent)
        asked = []
        t = time.monotonic()
        with pytest.raises(CriuFailed, match="CRIU exited before its page stream was complete"):
            pageserver.serve(ours, Sink(), alive=lambda: asked.append(1) or len(asked) < 3)
        assert time.monotonic() - t < 5 and len(asked) == 3
        theirs.close()
        ours.close()


@pytest.mark.parametrize("vaddr,nr_pages,flags", [(0, 0, 0), (0x7F, 0x7F, 1), (0x80, 0x80, 3),
                                                  (0x7F12_3456_7000, 1 << 22, 0x7F),
                                                  ((1 << 64) - 4096, (1 << 32) - 1, 1 << 20)])
def test_streamed_entry_payload_spells_out_encode_entry(vaddr, nr_pages, flags):
    from gpusnap.imagefile import pagemap, streamed
    assert streamed.entry_payload(vaddr, nr_pages, flags) == \
        pagemap.encode_entry({1: 0, 2: 0, 4: flags, 5: 0}, vaddr, nr_pages)


@pytest.mark.parametrize("alive", [None, lambda: True], ids=["blocking", "timeout"])
def test_a_sink_may_skip_an_entrys_pages_and_the_stream_stays_in_step(alive):
    """fill.skip(n) passes over n bytes (spliced to /dev/null): the pages after it, and the
    next entries, still arrive intact (benchmarks/dump_probe.py's null_splice row)."""
    rnd = random.Random(11)
    areas = [(0x10000, rnd.randbytes(300 * P)), (0x900000, rnd.randbytes(40 * P))]
    got = {}

    class Sink:
        def open(self, *a): pass

        def add(self, kind, ident, vaddr, nr_pages, flags, fill):
            n = nr_pages * P
            skipped = n // 2 if vaddr == 0x10000 else 0     # the first piece: skip half
            if skipped:
                fill.skip(skipped)
            buf = bytearray(n - skipped)
            fill(memoryview(buf))
            got[vaddr] = bytes(buf)

        def close(self): pass

    ours, theirs = socket.socketpair()
    client = threading.Thread(target=send_like_criu, args=(theirs, {5: areas}))
    client.start()
    try:
        pageserver.serve(ours, Sink(), alive=alive)
    finally:
        client.join()
        ours.close()
        theirs.close()
    first = areas[0][1][:256 * P]
    assert got[0x10000] == first[128 * P:]
    assert got[0x10000 + 256 * P] == areas[0][1][256 * P:]      # the next piece, read in full
    assert got[0x900000] == areas[1][1]


def _copying_sink(copier, got):
    class Sink:
        def open(self, *a): pass

        def add(self, kind, ident, vaddr, nr_pages, flags, fill):
            buf = bytearray(nr_pages * P)
            copier.copy(fill, memoryview(buf))
            got[vaddr] = buf

        def close(self):
            copier.wait()
    return Sink()


@pytest.mark.parametrize("criu_exits", [False, True], ids=["socket closed", "criu gone, socket held"])
def test_a_stream_cut_mid_piece_ends_and_closing_frees_the_waiting_copy_thread(monkeypatch, criu_exits):
    """CRIU's stream stops inside a piece a copy thread is already reading: the receiver
    fails (CRIU's end closed, or CRIU found gone while something holds its end) and
    close() ends the thread that waits on its pipe (it sees the pipe's end)."""
    from gpusnap.store import pipecopy
    monkeypatch.setattr(pageserver, "WAKE", 0.05)
    copier = pipecopy.PipeCopier(2)
    ours, theirs = socket.socketpair()
    psi = pageserver.PSI

    def criu():
        theirs.sendall(psi.pack(pageserver.OPEN2, 0, 0, 7 << 8 | 1))
        assert theirs.recv(1) == b"\0"
        theirs.sendall(psi.pack(pagemap.PE_PRESENT << 16 | pageserver.ADD_F, 64, 0x1000, 7 << 8 | 1)
                       + bytes(20 * P))
        if not criu_exits:
            theirs.shutdown(socket.SHUT_WR)
    client = threading.Thread(target=criu)
    client.start()
    t = time.monotonic()
    with pytest.raises(CriuFailed, match="ended in the middle" if not criu_exits else "CRIU exited"):
        pageserver.serve(ours, _copying_sink(copier, {}), alive=client.is_alive)
    copier.close()
    client.join()
    assert time.monotonic() - t < 5
    assert not [th for th in threading.enumerate() if th.name.startswith("gpusnap-copy")]
    ours.close()
    theirs.close()


def test_copy_threads_come_from_gpusnap_stream_copiers(monkeypatch, tmp_path):
    from gpusnap import hostcpu
    from gpusnap.store import pipecopy
    monkeypatch.setenv("GPUSNAP_STREAM_COPIERS", "0")
    assert pipecopy.threads() == 0
    sink = PageStream(Repository.open(str(tmp_path / "store")), workers=1)
    try:
        assert sink.copier is None and sink.timings()["stream_copiers"] == 0
    finally:
        sink.abort()
    monkeypatch.setenv("GPUSNAP_STREAM_COPIERS", "3")
    assert pipecopy.threads() == 3
    monkeypatch.setenv("GPUSNAP_STREAM_COPIERS", "100000")
    assert pipecopy.threads() == pipecopy.MAX_THREADS
    monkeypatch.setenv("GPUSNAP_STREAM_COPIERS", "many")
    cpus = hostcpu.count()
    assert pipecopy.threads() == (min(pipecopy.DEFAULT_THREADS, cpus - 1) if cpus >= pipecopy.MIN_CPUS else 0)
    assert [pipecopy.threads(n) for n in (1, 2, 3, 4, 5, 16, 64)] == [0, 0, 0, 3, 4, 4, 4]


def test_closing_a_copier_twice_or_under_sigterm_is_safe(monkeypatch):
    """A SIGTERM that lands while the copier closes waits for the end of it (then goes to
    the handler), and the undo's second close() finds nothing left to close: no EBADF
    (gpusnapd's SIGTERM test caught one)."""
    import signal
    from gpusnap.store import pipecopy
    copier = pipecopy.PipeCopier(2)
    got = []
    old = signal.signal(signal.SIGTERM, lambda *a: got.append("handled"))
    real = copier._join

    def join():
        if not got:
            os.kill(os.getpid(), signal.SIGTERM)      # mid-close, the first time
            time.sleep(0.05)
            assert got == []                           # held until the close is done
        real()
    monkeypatch.setattr(copier, "_join", join)
    try:
        copier.close()
        assert got == ["handled"] and copier.pipes == []
        copier.close()
    finally:
        signal.signal(signal.SIGTERM, old)


@settings(max_examples=25, deadline=None)
@given(threads=st.integers(1, 5), pipe_pages=st.sampled_from([1, 3, 16, 64]),
       small_pages=st.integers(0, 8), split=st.sampled_from([1, 7, 64, 256]),
       sizes=st.lists(st.integers(1, 300), min_size=1, max_size=12), seed=st.integers(0, 99))
def test_any_split_of_the_stream_over_copy_threads_lands_every_byte_in_place(
        threads, pipe_pages, small_pages, split, sizes, seed):
    """Whatever the threads, the pipe size (pieces), the size under which the reader
    copies itself, and how CRIU cuts its entries: every entry's bytes land where they
    belong, and the stream stays in step for the next entry."""
    from gpusnap.store import pipecopy
    rnd = random.Random(seed)
    areas = [(0x1000000 * (i + 1), rnd.randbytes(n * P)) for i, n in enumerate(sizes)]
    got: dict = {}
    old = pipecopy.PIPE_BYTES, pipecopy.SMALL
    pipecopy.PIPE_BYTES, pipecopy.SMALL = pipe_pages * P, small_pages * P
    try:
        copier = pipecopy.PipeCopier(threads)
    finally:
        pipecopy.PIPE_BYTES, pipecopy.SMALL = old
    ours, theirs = socket.socketpair()
    client = threading.Thread(target=send_like_criu, args=(theirs, {5: areas}, split))
    client.start()
    try:
        pageserver.serve(ours, _copying_sink(copier, got))
    finally:
        client.join()
        copier.close()
        ours.close()
        theirs.close()
    want = {v + off: data[off:off + split * P] for v, data in areas for off in range(0, len(data), split * P)}
    assert {k: bytes(v) for k, v in got.items()} == want


def test_a_copy_thread_that_fails_fails_the_stream_and_nothing_waits_on_it():
    """A thread's read fails (here: a read-only destination): the receiver's next copy or
    wait raises it, the pipe it no longer reads is drained so no splice into it sticks, and
    close() ends every thread."""
    from gpusnap.store import pipecopy
    copier = pipecopy.PipeCopier(2)

    class Fill:
        def __call__(self, view):
            view[:] = bytes(len(view))

        def splice(self, fd, n):
            data, off = bytes(n), 0
            while off < n:
                off += os.write(fd, data[off:])
    t = time.monotonic()
    with pytest.raises(BufferError):
        copier.copy(Fill(), memoryview(bytes(4 * copier.piece)))    # read-only: cannot land
        for _ in range(4):
            copier.copy(Fill(), memoryview(bytearray(8 * copier.piece)))
        copier.wait()
    with pytest.raises(BufferError):
        copier.wait()
    copier.close()
    assert time.monotonic() - t < 5
    assert not [th for th in threading.enumerate() if th.name.startswith("gpusnap-copy")]


@pytest.mark.skipif(not pagestream.workers_may_read(), reason="a forked worker may not read this process")
def test_private_slots_read_by_the_workers_store_what_shared_slots_store(tmp_path, monkeypatch):
    """The slots private to the stream's process (huge pages; the default for a stream
    that grows, where a worker may read them), each forked worker reading its slot with
    process_vm_readv: the chunks, the pages read back and the counts are those of shared
    slots (GPUSNAP_STREAM_PRIVATE=0)."""
    monkeypatch.delenv("GPUSNAP_STREAM_SLOTS", raising=False)
    monkeypatch.delenv("GPUSNAP_STREAM_PRIVATE", raising=False)
    vaddr = 0x7f0000000000
    data = random.Random(11).randbytes(3 * pagestream.SLOT_BYTES + 40 * P) + bytes(64 * P)
    maps, vmas = {7: [(vaddr, data)]}, {7: [(vaddr, vaddr + len(data), ANON_FLAGS, ANON)]}
    timings: dict = {}
    private = stream(tmp_path / "a", maps, vmas, workers=3, grow=24 * 4 * pagestream.SLOT_BYTES,
                     out=timings)
    monkeypatch.setenv("GPUSNAP_STREAM_PRIVATE", "0")
    shared_timings: dict = {}
    shared = stream(tmp_path / "b", maps, vmas, workers=3, out=shared_timings)
    assert timings["stream_private"] == 1 and timings["stream_w_read"] > 0, timings
    assert shared_timings["stream_private"] == 0 and not shared_timings.get("stream_w_read")
    assert [f.chunks for f in private[2]] == [f.chunks for f in shared[2]]
    assert private[3] == shared[3]
    assert pages_of(private[0], private[2][0]) == pages_of(shared[0], shared[2][0])


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="drops CAP_SYS_PTRACE with setpriv: root")
def test_private_slots_fall_back_to_shared_where_the_kernel_refuses_the_read(tmp_path):
    """A gpusnap whose workers may not read it (here: not dumpable, and no CAP_SYS_PTRACE,
    so the kernel refuses process_vm_readv; in the field an LSM's rule) though Yama would
    let them: the growing stream's probe read fails before any page is sent, the stream
    maps shared slots instead, and the dump's pages are stored all the same."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import ctypes, json, random, sys
sys.path[:0] = [{str(HERE)!r}]
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)          # PR_SET_DUMPABLE 0
from gpusnap.store import pagestream
pagestream.workers_may_read = lambda: True     # what a host without Yama says
from test_page_stream import stream, pages_of, ANON_FLAGS, ANON
import pathlib
vaddr = 0x7f0000000000
data = random.Random(5).randbytes(pagestream.SLOT_BYTES + 8 * 4096)
timings = {{}}
repo, _i, files, counts, _s = stream(pathlib.Path({str(tmp_path)!r}), {{7: [(vaddr, data)]}},
                                     {{7: [(vaddr, vaddr + len(data), ANON_FLAGS, ANON)]}},
                                     workers=2, grow=64 * pagestream.SLOT_BYTES, out=timings)
print(json.dumps({{"private": timings["stream_private"], "same": pages_of(repo, files[0]) == data}}))
""")
    env = {k: v for k, v in os.environ.items() if k != "GPUSNAP_STREAM_PRIVATE"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace",
                           sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"private": 0, "same": True}


@pytest.mark.parametrize("yama,caps,want", [(None, "0", True), ("0", "0", True),
                                            ("1", "0000000000080000", True), ("1", "ffffffffff7ffff", False),
                                            ("2", "000001fffeffffff", True), ("3", "000001ffffffffff", False),
                                            ("junk", "0", True)])
def test_workers_may_read_follows_yama_and_cap_sys_ptrace(tmp_path, yama, caps, want):
    yama_path = tmp_path / "ptrace_scope"
    if yama is not None:
        yama_path.write_text(yama + "\n")
    status = tmp_path / "status"
    status.write_text(f"Name:\tx\nCapInh:\t0\nCapEff:\t{caps}\n")
    assert pagestream.workers_may_read(str(yama_path), str(status)) is want


@pytest.mark.parametrize("setting,grows,want", [(None, True, True), (None, False, False),
                                                ("1", False, True), ("0", True, False)])
def test_private_slots_by_default_only_for_a_stream_that_grows(monkeypatch, setting, grows, want):
    """A stream that does not grow reuses its few slots (touched once), where private slots
    would only add the workers' copy; GPUSNAP_STREAM_PRIVATE=1 and =0 decide either way."""
    monkeypatch.setattr(pagestream, "workers_may_read", lambda: True)
    if setting is None:
        monkeypatch.delenv("GPUSNAP_STREAM_PRIVATE", raising=False)
    else:
        monkeypatch.setenv("GPUSNAP_STREAM_PRIVATE", setting)
    assert pagestream.private_wanted(grows) is want
