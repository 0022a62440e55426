"""The store without CRIU: ingest, dedup, zero chunks, materialise, verify, gc, locks, privacy."""

from __future__ import annotations

import os
import random
import stat

import pytest

from gpusnap.errors import (AmbiguousSnapshot, InsecureStore, IntegrityError, ManifestInvalid,
                            SnapshotNotFound, StoreLocked)
from gpusnap.store import Repository
from gpusnap.store.chunker import CHUNK_SIZE

from gpusnap.model import FileEntry, Manifest, Target

from conftest import commit_snapshot, write_images


def _snapshot(repo: Repository, src: str, name: str | None = None) -> Manifest:
    return commit_snapshot(repo, src, name)


@pytest.fixture
def repo(tmp_path):
    return Repository.open(str(tmp_path / "store"))


def test_roundtrip_is_byte_exact_and_zero_chunks_are_not_stored(repo, tmp_path):
    rnd = random.Random(3)
    data = rnd.randbytes(3 * CHUNK_SIZE + 123) + bytes(4 * CHUNK_SIZE) + rnd.randbytes(5000)
    src = write_images(str(tmp_path / "img"), {"pages-1.img": data, "core-1.img": b"core"})
    m = _snapshot(repo, src)
    zero_refs = [c for c, _ in m.files[1].chunks if c == "zero"]
    assert len(zero_refs) >= 3
    assert m.bytes_new < len(data) - 3 * CHUNK_SIZE
    out = str(tmp_path / "out")
    repo.materialise(repo.load(m.id), out)
    assert open(os.path.join(out, "pages-1.img"), "rb").read() == data
    assert open(os.path.join(out, "core-1.img"), "rb").read() == b"core"


def test_identical_content_is_stored_once(repo, tmp_path):
    data = random.Random(1).randbytes(2 * CHUNK_SIZE)
    a = _snapshot(repo, write_images(str(tmp_path / "a"), {"x.img": data}))
    b = _snapshot(repo, write_images(str(tmp_path / "b"), {"x.img": data}))
    assert a.bytes_new > 0 and b.bytes_new == 0
    assert b.bytes_stored == a.bytes_stored


def test_store_is_private(repo):
    for root, dirs, files in os.walk(repo.path):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) & 0o077 == 0
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) & 0o077 == 0
    os.chmod(repo.path, 0o777)
    with pytest.raises(InsecureStore):
        Repository.open(repo.path)


def test_corruption_is_detected_by_verify_and_materialise(repo, tmp_path):
    m = _snapshot(repo, write_images(str(tmp_path / "img"), {"pages-1.img": random.Random(2).randbytes(CHUNK_SIZE)}))
    cid = m.files[0].chunks[0][0]
    path = repo.chunk_path(cid)
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 1
    open(path, "wb").write(bytes(blob))
    assert repo.verify()["bad"]
    with pytest.raises(IntegrityError):
        repo.materialise(repo.load(m.id), str(tmp_path / "out"))
    os.unlink(path)
    assert "missing" in repo.verify()["bad"][0]["error"]


def test_truncated_manifest_is_an_integrity_error(repo, tmp_path):
    m = _snapshot(repo, write_images(str(tmp_path / "img"), {"a.img": b"a"}))
    path = os.path.join(repo.snapshots_dir, m.id + ".json")
    open(path, "r+b").truncate(10)
    with pytest.raises(IntegrityError):
        repo.load(m.id)
    assert repo.verify()["bad"]


def test_resolve_by_id_prefix_and_name(repo, tmp_path):
    a = _snapshot(repo, write_images(str(tmp_path / "a"), {"a.img": b"a"}), name="srv")
    assert repo.resolve(a.id) == a.id
    assert repo.resolve(a.id[:6]) == a.id
    assert repo.resolve("srv") == a.id
    with pytest.raises(SnapshotNotFound):
        repo.resolve("nope")
    ids = [a.id] + [_snapshot(repo, write_images(str(tmp_path / f"b{i}"), {"a.img": b"b"})).id
                       for i in range(40)]
    common = next((p for p in "0123456789abcdef" if sum(i.startswith(p) for i in ids) > 1))
    with pytest.raises(AmbiguousSnapshot):
        repo.resolve(common)


def test_load_ref_reads_an_id_without_listing_and_resolves_the_rest(repo, tmp_path, monkeypatch):
    a = _snapshot(repo, write_images(str(tmp_path / "a"), {"a.img": b"a"}), name="srv")
    for ref in (a.id[:6], "srv"):
        assert repo.load_ref(ref).id == a.id
    with pytest.raises(SnapshotNotFound):
        repo.load_ref("0" * 16)
    with pytest.raises(SnapshotNotFound):
        repo.load_ref("f" * 200)
    open(os.path.join(repo.snapshots_dir, a.id + ".json"), "r+b").truncate(10)
    with pytest.raises(IntegrityError):
        repo.load_ref(a.id)                 # an id's bad manifest is not read as a prefix
    b = _snapshot(repo, write_images(str(tmp_path / "b"), {"a.img": b"b"}))

    def no_listing(prefix):
        raise AssertionError(f"listed {prefix}")
    monkeypatch.setattr(repo.backend, "list", no_listing)
    assert repo.load_ref(b.id).id == b.id


def test_rm_then_gc_frees_only_unreferenced_chunks(repo, tmp_path):
    shared = random.Random(5).randbytes(CHUNK_SIZE)
    a = _snapshot(repo, write_images(str(tmp_path / "a"), {"x.img": shared + b"A" * 100}))
    b = _snapshot(repo, write_images(str(tmp_path / "b"), {"x.img": shared + b"B" * 100}))
    repo.remove([a.id])
    plan = repo.gc_plan()
    assert len(plan["chunks"]) == 1
    repo.gc_execute(plan)
    assert repo.verify()["bad"] == []
    repo.materialise(repo.load(b.id), str(tmp_path / "out"))


def test_exclusive_lock_excludes_shared(repo):
    with repo.shared_lock():
        with repo.shared_lock(timeout=0.2):
            pass
        with pytest.raises(StoreLocked):
            with repo.exclusive_lock(timeout=0.2):
                pass


def test_manifest_paths_cannot_escape(repo, tmp_path):
    m = Manifest(target=Target("process", 1, [1]), pids=[1],
                 files=[FileEntry("../evil", 1, 0o600, [("zero", 1)])])    # not validated
    with pytest.raises(IntegrityError, match="escapes"):
        repo.materialise(m, str(tmp_path / "out"))


def test_a_manifest_under_another_snapshots_name_is_refused(repo, tmp_path):
    m = _snapshot(repo, write_images(str(tmp_path / "a"), {"a.img": b"a"}))
    other = "0123456789abcdef"
    os.rename(os.path.join(repo.snapshots_dir, m.id + ".json"),
              os.path.join(repo.snapshots_dir, other + ".json"))
    with pytest.raises(ManifestInvalid, match=f"names itself {m.id}"):
        repo.load(other)
    assert repo.verify()["bad"][0]["snapshot"] == other


def test_commit_fills_in_id_and_created(repo, tmp_path):
    files, counts = repo.ingest_dir(write_images(str(tmp_path / "a"), {"a.img": b"a"}))
    m = Manifest(target=Target("process", 1, [1]), pids=[1], files=files, **counts)
    sid = repo.commit(m)
    assert m.id == sid and m.created and m.format == 1
    assert repo.load(sid).files[0].path == "a.img"


def test_a_chunk_sent_by_two_workers_is_new_and_stored_once():
    from gpusnap.store.tally import Tally
    t = Tally()
    t.add("a", 10, 0)           # a piece whose worker found it claimed in its process
    t.add("a", 10, 10)          # the worker that sent it
    t.add("a", 10, 10)          # a worker of another process that sent it too
    t.add("b", 5, 0)
    assert (t.stored, t.new) == (15, 10)
