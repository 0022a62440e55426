"""A local store's write ordering (docs/design.md, "Write ordering"): every chunk's bytes
are fsynced before its name appears, the directories of every chunk a manifest names
are fsynced before the manifest's rename, also for chunks another writer stored (dedup).
The real calls run; the test only records their order (ingest on threads, so the
records stay in this process)."""

from __future__ import annotations

import os
import random

import pytest

from gpusnap.store import Repository, fsutil
from gpusnap.store.chunker import CHUNK_SIZE

from conftest import commit_snapshot, write_images


@pytest.fixture
def record(monkeypatch):
    """The ordered list of ('fsync', path) / ('rename', src, dst) the store makes."""
    calls = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *a, **kw):
        calls.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setenv("GPUSNAP_THREADS", "1")
    return calls


def _images(tmp_path, seed: int, n: int = 3) -> str:
    rnd = random.Random(seed)
    return write_images(str(tmp_path / f"img{seed}"),
                        {"pages-1.img": rnd.randbytes(n * CHUNK_SIZE + 77)})


class _Libc:
    """fsutil's libc, with each waited-for writeback recorded as ('wait', path)."""

    def __init__(self, real, calls):
        self.real, self.calls = real, calls

    def sync_file_range(self, fd, offset, nbytes, flags):
        if flags == 7:                  # WAIT_BEFORE | WRITE | WAIT_AFTER
            self.calls.append(("wait", os.readlink(f"/proc/self/fd/{fd}")))
        return self.real.sync_file_range(fd, offset, nbytes, flags)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("mode", ["each", "auto"])
def test_each_chunk_is_durable_before_its_name_appears(tmp_path, record, monkeypatch, mode):
    """each: the chunk's own fsync. auto (batch, ext4/XFS): its writeback waited for, then
    one fsync of a new unnamed file in the store's tmp/ (a journal commit newer than every
    allocation of the batch, and the disk's cache flushed) before any rename."""
    monkeypatch.setenv("GPUSNAP_FSYNC", mode)
    if mode == "auto" and not fsutil.batch_fsync(str(tmp_path)):
        pytest.skip("batch fsync needs ext4 or XFS under the test's tmp dir")
    monkeypatch.setattr(fsutil, "_libc", _Libc(fsutil._libc, record))
    repo = Repository.open(str(tmp_path / "store"))
    record.clear()
    m = commit_snapshot(repo, _images(tmp_path, 1, n=40))
    chunks = {repo.chunk_path(c) for c in m.chunk_sizes()}
    assert len(chunks) >= 3
    commits = 0
    for i, call in enumerate(record):
        if call[0] == "fsync" and "/#" in call[1]:
            commits += 1
        if call[0] != "rename" or call[2] not in chunks:
            continue
        if mode == "each":
            assert ("fsync", call[1]) in record[:i], f"{call[2]} renamed before its fsync"
            continue
        waited = record.index(("wait", call[1]))
        assert waited < i, f"{call[2]} renamed before its writeback was waited for"
        assert any(c[0] == "fsync" and c[1].startswith(os.path.join(repo.path, "tmp", "#"))
                   for c in record[waited:i]), f"{call[2]} renamed before a journal commit"
    if mode == "auto":                  # fewer flushes than chunks: the point of it
        assert 0 < commits < len(chunks)


def test_commit_fsyncs_every_chunk_directory_before_the_manifest(tmp_path, record):
    repo = Repository.open(str(tmp_path / "store"))
    first = commit_snapshot(repo, _images(tmp_path, 1))
    # the second dump finds every chunk of the first stored already (dedup), plus new ones
    src = _images(tmp_path, 2)
    with open(os.path.join(src, "pages-2.img"), "wb") as f, \
            open(os.path.join(tmp_path, "img1", "pages-1.img"), "rb") as old:
        f.write(old.read())
    record.clear()
    second = commit_snapshot(repo, src)
    assert set(first.chunk_sizes()) < set(second.chunk_sizes())
    manifest = next(i for i, c in enumerate(record)
                    if c[0] == "rename" and c[2].endswith(f"{second.id}.json"))
    synced = {c[1] for c in record[:manifest] if c[0] == "fsync"}
    for cid in second.chunk_sizes():            # the deduplicated ones too
        assert os.path.dirname(repo.chunk_path(cid)) in synced
    assert repo.chunks_dir in synced


@pytest.mark.parametrize("beside", [False, True], ids=["tmp_dir", "beside"])
def test_a_failed_batch_leaves_no_temp_file(tmp_path, monkeypatch, beside):
    """beside=True (the local store's chunks): temp files sit in the final directory, under
    fsutil.TEMP_PREFIX, and go on failure as those in tmp/ do."""
    items = [(str(tmp_path / "d" / f"n{i}"), b"x" * 100) for i in range(5)]
    real_rename, seen = os.rename, []

    def rename(src, dst):
        if beside:
            assert os.path.dirname(src) == os.path.dirname(dst)     # one directory
            assert os.path.basename(src).startswith(fsutil.TEMP_PREFIX)
        seen.append(dst)
        if len(seen) == 3:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        fsutil.write_renamed_many(items, str(tmp_path / "tmp"), fsync=True, beside=beside)
    assert os.listdir(tmp_path / "tmp") == []
    assert sorted(os.listdir(tmp_path / "d")) == ["n0", "n1"]


def test_a_killed_writers_temp_beside_a_chunk_is_no_chunk_and_gc_removes_it(tmp_path):
    repo = Repository.open(str(tmp_path / "store"))
    m = commit_snapshot(repo, _images(tmp_path, 1))
    cid = next(iter(m.chunk_sizes()))
    left = os.path.join(os.path.dirname(repo.chunk_path(cid)), f"{fsutil.TEMP_PREFIX}{cid}.1.2")
    with open(left, "wb") as f:
        f.write(b"half a chunk")
    assert all(fsutil.TEMP_PREFIX not in n for n, _s in repo.backend.list("chunks/"))
    plan = repo.gc_plan()
    assert plan["chunks"] == [] or cid not in plan["chunks"]
    assert f"chunks/{cid[:2]}/{os.path.basename(left)}" in plan["temps"]
    repo.gc_execute(plan)
    assert not os.path.exists(left) and os.path.exists(repo.chunk_path(cid))
