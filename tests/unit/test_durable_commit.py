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


def test_each_chunk_is_fsynced_before_its_name_appears(tmp_path, record):
    repo = Repository.open(str(tmp_path / "store"))
    record.clear()
    m = commit_snapshot(repo, _images(tmp_path, 1))
    chunks = {repo.chunk_path(c) for c in m.chunk_sizes()}
    assert len(chunks) >= 3
    for i, call in enumerate(record):
        if call[0] == "rename" and call[2] in chunks:
            assert ("fsync", call[1]) in record[:i], f"{call[2]} renamed before its fsync"


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


def test_a_failed_batch_leaves_no_temp_file(tmp_path, monkeypatch):
    items = [(str(tmp_path / "d" / f"n{i}"), b"x" * 100) for i in range(5)]
    real_rename, seen = os.rename, []

    def rename(src, dst):
        seen.append(dst)
        if len(seen) == 3:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        fsutil.write_renamed_many(items, str(tmp_path / "tmp"), fsync=True)
    assert os.listdir(tmp_path / "tmp") == []
    assert sorted(os.listdir(tmp_path / "d")) == ["n0", "n1"]
