"""export / import without CRIU: round trip, idempotence, and every refusal of a bad archive."""

from __future__ import annotations

import io
import json
import os
import random
import stat
import tarfile

import pytest

from gpusnap.errors import ArchiveError, IntegrityError
from gpusnap.store import Repository, archive
from gpusnap.store.chunker import CHUNK_SIZE

from conftest import commit_snapshot


@pytest.fixture
def src(tmp_path):
    repo = Repository.open(str(tmp_path / "a"))
    img = tmp_path / "img"
    img.mkdir()
    rnd = random.Random(7)
    (img / "pages-1.img").write_bytes(rnd.randbytes(2 * CHUNK_SIZE) + bytes(CHUNK_SIZE) + rnd.randbytes(99))
    (img / "core-1.img").write_bytes(b"core")
    return repo, commit_snapshot(repo, str(img), "n").id


def _export(repo, sid) -> bytes:
    out = io.BytesIO()
    archive.export(repo, sid, out)
    return out.getvalue()


def _members(blob: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar]


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _info(name: str, data: bytes, **kw) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data


def test_round_trip_into_a_fresh_store_is_byte_exact(src, tmp_path):
    repo, sid = src
    path = str(tmp_path / "snap.tar")
    archive.export_to_path(repo, sid, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    dst = Repository.open(str(tmp_path / "b"))
    with open(path, "rb") as f:
        res = archive.import_(dst, f)
    assert res.id == sid and res.chunks_imported == 4 and not res.already_present
    assert dst.load(sid) == repo.load(sid)
    assert dst.verify()["bad"] == []
    repo.materialise(repo.load(sid), str(tmp_path / "x"))
    dst.materialise(dst.load(sid), str(tmp_path / "y"))
    for name in ("pages-1.img", "core-1.img"):
        assert open(tmp_path / "x" / name, "rb").read() == open(tmp_path / "y" / name, "rb").read()


def test_importing_twice_is_a_no_op(src, tmp_path):
    repo, sid = src
    blob = _export(repo, sid)
    dst = Repository.open(str(tmp_path / "b"))
    archive.import_(dst, io.BytesIO(blob))
    again = archive.import_(dst, io.BytesIO(blob))
    assert again.already_present and again.chunks_imported == 0 and again.chunks_present == 4
    assert dst.snapshot_ids() == [sid]


def test_same_id_with_another_manifest_is_refused(src, tmp_path):
    repo, sid = src
    members = _members(_export(repo, sid))
    m = json.loads(members[1][1])
    m["name"] = "other"
    members[1] = _info("manifest.json", json.dumps(m).encode())
    dst = Repository.open(str(tmp_path / "b"))
    archive.import_(dst, io.BytesIO(_export(repo, sid)))
    with pytest.raises(ArchiveError, match="different snapshot"):
        archive.import_(dst, io.BytesIO(_tar(members)))


def _refused(src, tmp_path, mutate, error=ArchiveError, match=None, **kw):
    repo, sid = src
    members = _members(_export(repo, sid))
    members = mutate(members)
    dst = Repository.open(str(tmp_path / "b"))
    with pytest.raises(error, match=match):
        archive.import_(dst, io.BytesIO(_tar(members)), **kw)
    assert dst.snapshot_ids() == [], "nothing becomes visible"


def test_a_corrupt_chunk_is_refused_before_the_manifest(src, tmp_path):
    def flip(ms):
        info, data = ms[2]
        data = bytearray(data)
        data[len(data) // 2] ^= 1
        ms[2] = (info, bytes(data))
        return ms
    _refused(src, tmp_path, flip, IntegrityError)


def test_path_traversal_is_refused(src, tmp_path):
    _refused(src, tmp_path, lambda ms: ms + [_info("../../etc/evil", b"x")], match="unsafe path")
    _refused(src, tmp_path, lambda ms: ms + [_info("/abs", b"x")], match="unsafe path")


def test_symlinks_and_non_regular_members_are_refused(src, tmp_path):
    link = tarfile.TarInfo("chunks/" + "a" * 64)
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _refused(src, tmp_path, lambda ms: ms[:2] + [(link, b"")] + ms[2:], match="symlink")
    fifo = tarfile.TarInfo("chunks/" + "b" * 64)
    fifo.type = tarfile.FIFOTYPE
    _refused(src, tmp_path, lambda ms: ms[:2] + [(fifo, b"")] + ms[2:], match="non-regular")


def test_a_member_larger_than_declared_is_refused(src, tmp_path):
    def grow(ms):
        info, data = ms[2]
        ms[2] = _info(info.name, data + b"\0" * 100)
        return ms
    _refused(src, tmp_path, grow, match="declared")


def test_an_archive_over_the_limit_is_refused(src, tmp_path):
    _refused(src, tmp_path, lambda ms: ms, match="limit", max_bytes=1000)


def test_missing_duplicate_or_undeclared_chunks_are_refused(src, tmp_path):
    _refused(src, tmp_path, lambda ms: ms[:-1], match="missing")
    _refused(src, tmp_path, lambda ms: ms + [ms[-1]], match="twice")
    _refused(src, tmp_path, lambda ms: ms + [_info("chunks/" + "c" * 64, b"x")], match="not declared")


def test_header_must_come_first(src, tmp_path):
    _refused(src, tmp_path, lambda ms: [ms[1], ms[0]] + ms[2:], match="must start")
    _refused(src, tmp_path, lambda ms: [_info("gpusnap-archive.json", b"{}")] + ms[1:], match="bad header")


def test_not_a_tar_is_an_archive_error(tmp_path):
    dst = Repository.open(str(tmp_path / "b"))
    with pytest.raises(ArchiveError):
        archive.import_(dst, io.BytesIO(b"hello" * 1000))
