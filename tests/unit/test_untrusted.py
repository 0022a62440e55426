"""Untrusted bytes: zstd frames that lie about their size, stores that hold symlinks,
--store paths that are not ours."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import tarfile

import pytest
import zstandard

from gpusnap.errors import ArchiveError, InsecureStore, IntegrityError, StoreError
from conftest import commit_snapshot
from gpusnap.store import Repository, archive, codec


def _frame_declaring(size: int) -> bytes:
    """A zstd frame header that declares size bytes (8-byte content size, single
    segment), then one last RLE block of 4 bytes: a few bytes that claim a terabyte."""
    magic = struct.pack("<I", 0xFD2FB528)
    descriptor = bytes([0b1110_0000])
    block = (1 | (1 << 1) | (4 << 3)).to_bytes(3, "little") + b"\0"
    return magic + descriptor + struct.pack("<Q", size) + block


def test_a_frame_declaring_a_terabyte_is_refused_before_allocating():
    blob = _frame_declaring(1 << 40)
    assert zstandard.frame_content_size(blob) == 1 << 40
    with pytest.raises(IntegrityError, match="declares"):
        codec.PLAIN.decode(blob, "ab" * 32, 1 << 20)


def test_a_frame_larger_than_the_manifest_says_is_refused_unread():
    blob = zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20))
    assert len(blob) < 64 << 10
    with pytest.raises(IntegrityError, match="declares"):
        codec.PLAIN.decode(blob, codec.chunk_id(bytes(64 << 20)), 1 << 20)


def test_a_frame_without_a_declared_size_is_bounded():
    blob = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(8 << 20))
    with pytest.raises(IntegrityError):
        codec.PLAIN.decode(blob, "ab" * 32, 1 << 20)


def test_an_encrypted_manifest_is_bounded_too():
    pytest.importorskip("cryptography")
    enc = codec.EncryptedCodec(bytes(32))
    sealed = enc._encrypt(_frame_declaring(1 << 40), b"snapshot:s1")
    with pytest.raises(IntegrityError, match="declares"):
        enc.unseal("s1", sealed)


def test_an_archive_chunk_that_declares_a_terabyte_is_an_integrity_error(tmp_path):
    src = Repository.open(str(tmp_path / "a"))
    img = tmp_path / "img"
    img.mkdir()
    (img / "pages-1.img").write_bytes(b"x" * 5000)
    sid = commit_snapshot(src, str(img)).id
    out = io.BytesIO()
    archive.export(src, sid, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    bomb = _frame_declaring(1 << 40)
    header = json.loads(members[0][1])
    cid = next(iter(header["chunks"]))
    header["chunks"][cid] = len(bomb)
    header["bytes"] = len(bomb)
    forged = io.BytesIO()
    with tarfile.open(fileobj=forged, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in [(members[0][0], json.dumps(header).encode()), members[1],
                           (members[2][0], bomb)]:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dst = Repository.open(str(tmp_path / "b"))
    with pytest.raises((IntegrityError, ArchiveError)):
        archive.import_(dst, io.BytesIO(forged.getvalue()))
    assert dst.snapshot_ids() == []


# ---- --store: checked before anything is written ------------------------------------------

def _tree(path) -> dict:
    """Every entry under path with its mode and owner: what must not change."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in [".", *dirs, *files]:
            p = os.path.normpath(os.path.join(root, name))
            st = os.lstat(p)
            out[os.path.relpath(p, path)] = (st.st_mode, st.st_uid)
    return out


def test_a_missing_store_is_created_private(tmp_path):
    repo = Repository.open(str(tmp_path / "new" / "store"))
    assert stat.S_IMODE(os.lstat(repo.path).st_mode) == 0o700
    assert sorted(os.listdir(repo.path)) == ["chunks", "config", "snapshots", "tmp"]


def test_an_empty_private_directory_becomes_a_store(tmp_path):
    d = tmp_path / "mine"
    d.mkdir(mode=0o700)
    Repository.open(str(d))
    assert (d / "config").exists()


@pytest.mark.parametrize("mode", [0o1777, 0o755, 0o770])
def test_a_directory_open_to_others_is_refused_untouched(tmp_path, mode):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    before = _tree(d)
    with pytest.raises(InsecureStore, match="open to other users"):
        Repository.open(str(d))
    assert _tree(d) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory of another uid")
def test_another_users_directory_is_refused_untouched(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    before = _tree(d)
    with pytest.raises(InsecureStore, match="belongs to uid 65534"):
        Repository.open(str(d))
    assert _tree(d) == before


def test_a_symlink_at_the_store_path_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    (tmp_path / "world").mkdir()
    link = tmp_path / "world" / "store"
    link.symlink_to(victim)
    with pytest.raises(InsecureStore, match="symbolic link"):
        Repository.open(str(link))
    assert os.listdir(victim) == [] and stat.S_IMODE(os.stat(victim).st_mode) == 0o755


def test_a_directory_holding_other_files_is_not_made_a_store(tmp_path):
    d = tmp_path / "home"
    d.mkdir(mode=0o700)
    (d / "thesis.tex").write_text("x")
    before = _tree(d)
    with pytest.raises(StoreError, match="not empty"):
        Repository.open(str(d))
    assert _tree(d) == before


# ---- gc never follows a symlink out of the store ---------------------------------------------

@pytest.mark.parametrize("where", ["tmp", "chunks/ab"])
def test_a_store_holding_symlinks_is_refused_and_gc_deletes_nothing(tmp_path, where):
    repo = Repository.open(str(tmp_path / "store"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_bytes(b"keep me")
    target = os.path.join(repo.path, where)
    if os.path.isdir(target):
        os.rmdir(target)
    os.symlink(victim, target)
    with pytest.raises(InsecureStore, match="symbolic link"):
        Repository.open(repo.path)
    with pytest.raises(InsecureStore):
        repo.gc_execute(repo.gc_plan())       # a store opened before the link was planted
    assert (victim / "precious").read_bytes() == b"keep me"
