"""Untrusted bytes: zstd frames that lie about their size, stores that hold symlinks,
--store paths that are not ours."""

from __future__ import annotations

import io
import json
import struct
import tarfile

import pytest
import zstandard

from gpusnap.errors import ArchiveError, IntegrityError
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
    files, counts = src.ingest_dir(str(img))
    sid = src.commit({"target": {"kind": "process", "root_pid": 1}, "pids": [1],
                      "files": files, "logs": [], **counts})
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
