"""Encryption at rest without CRIU: key files, keyed ids, authenticated chunks and
manifests, wrong/missing keys, archives between stores, the CLI."""

from __future__ import annotations

import io
import json
import os
import random
import stat

import pytest
from click.testing import CliRunner

from gpusnap.cli import cli, main
from gpusnap.errors import (ALL_ERRORS, ArchiveError, InsecureStore, IntegrityError, StoreError,
                            UsageError, WrongKey)
from gpusnap.model import Manifest, Target
from gpusnap.store import Repository, archive, codec, keyfile
from gpusnap.store.chunker import CHUNK_SIZE

from conftest import commit_snapshot, write_images

MARKER = b"gpusnap-secret-marker:" * 4096       # compressible and easy to search for


@pytest.fixture
def key(tmp_path):
    path = str(tmp_path / "store.key")
    keyfile.generate(path)
    return path


@pytest.fixture
def other_key(tmp_path):
    path = str(tmp_path / "other.key")
    keyfile.generate(path)
    return path


def _snapshot(repo: Repository, src: str, name: str | None = "secret-name") -> Manifest:
    return commit_snapshot(repo, src, name,
                           target=Target(kind="process", root_pid=1, pids=[1], cmdline=["llm-server"]))


def _data() -> bytes:
    rnd = random.Random(5)
    return rnd.randbytes(CHUNK_SIZE + 77) + MARKER + bytes(2 * CHUNK_SIZE) + rnd.randbytes(1000)


@pytest.fixture
def enc(tmp_path, key):
    repo = Repository.open(str(tmp_path / "store"), key_file=key)
    m = _snapshot(repo, write_images(str(tmp_path / "img"), {"pages-1.img": _data(), "core-1.img": b"c"}))
    return repo, m


def _all_store_bytes(path: str) -> bytes:
    out = b""
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out += fh.read()
    return out


# ---- key files ----------------------------------------------------------------------------

def test_generated_key_is_private_random_and_never_overwritten(tmp_path, key):
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    text = open(key).read()
    assert len(text.strip()) == 64 and text.endswith("\n")
    assert len(keyfile.load(key)) == 32
    other = str(tmp_path / "k2")
    keyfile.generate(other)
    assert keyfile.load(other) != keyfile.load(key)
    with pytest.raises(UsageError, match="never overwritten"):
        keyfile.generate(key)
    assert open(key).read() == text


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700])
def test_key_file_readable_by_others_or_odd_mode_is_refused(key, mode):
    os.chmod(key, mode)
    with pytest.raises(InsecureStore):
        keyfile.load(key)


def test_read_only_key_file_is_accepted(key):
    os.chmod(key, 0o400)
    assert len(keyfile.load(key)) == 32


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_key_file_of_another_user_is_refused(key):
    os.chown(key, 65534, -1)
    with pytest.raises(InsecureStore, match="belongs to uid"):
        keyfile.load(key)


def test_malformed_or_missing_key_file(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    os.chmod(bad, 0o600)
    with pytest.raises(WrongKey):
        keyfile.load(str(bad))
    raw = tmp_path / "raw.key"
    raw.write_bytes(os.urandom(32))
    os.chmod(raw, 0o600)
    assert keyfile.load(str(raw)) == raw.read_bytes()
    with pytest.raises(StoreError, match="cannot read"):
        keyfile.load(str(tmp_path / "nope.key"))


def test_insecure_key_file_creates_no_store(tmp_path, key):
    os.chmod(key, 0o644)
    with pytest.raises(InsecureStore):
        Repository.open(str(tmp_path / "s"), key_file=key)
    assert not os.path.exists(tmp_path / "s")


# ---- the encrypted store -------------------------------------------------------------------

def test_encrypted_round_trip_is_byte_exact_and_nothing_plain_is_stored(enc, tmp_path):
    repo, m = enc
    config = json.load(open(os.path.join(repo.path, "config")))
    assert config["encryption"] == "aes-256-gcm" and config["hash"] == "hmac-sha256"
    assert config["version"] == 2 and len(config["key_check"]) == 64
    out = str(tmp_path / "out")
    repo.materialise(repo.load(m.id), out)
    assert open(os.path.join(out, "pages-1.img"), "rb").read() == _data()
    stored = _all_store_bytes(repo.path)
    for secret in (b"gpusnap-secret-marker", b"secret-name", b"llm-server", b"pages-1.img"):
        assert secret not in stored, secret
    plain_ids = {codec.chunk_id(_data()[:CHUNK_SIZE])}
    assert not plain_ids & {c for f in m.files for c, _ in f.chunks}, "ids are keyed"
    assert repo.verify()["bad"] == []
    assert [s.name for s in repo.list()] == ["secret-name"]


def test_encrypted_store_dedups_and_zero_chunks_stay_holes(enc, tmp_path):
    repo, m = enc
    again = _snapshot(repo, write_images(str(tmp_path / "img2"), {"pages-1.img": _data()}))
    assert again.bytes_new == 0
    assert sum(1 for f in m.files for c, _ in f.chunks if c == codec.ZERO_ID) >= 1


def test_opening_needs_the_right_key(enc, other_key, tmp_path):
    repo, _ = enc
    with pytest.raises(WrongKey, match="is encrypted"):
        Repository.open(repo.path)
    with pytest.raises(WrongKey, match="wrong key"):
        Repository.open(repo.path, key_file=other_key)
    plain = Repository.open(str(tmp_path / "plain"))
    with pytest.raises(WrongKey, match="not encrypted"):
        Repository.open(plain.path, key_file=other_key)


def _flip(path: str) -> None:
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 1
    open(path, "wb").write(bytes(blob))


def test_a_flipped_byte_in_a_chunk_fails_the_tag(enc, tmp_path):
    repo, m = enc
    cid = m.files[1].chunks[0][0]
    _flip(repo.chunk_path(cid))
    bad = repo.verify()["bad"]
    assert len(bad) == 1 and "authentication" in bad[0]["error"]
    with pytest.raises(IntegrityError):
        repo.materialise(repo.load(m.id), str(tmp_path / "out"))


def test_a_chunk_moved_under_another_id_fails(enc, tmp_path):
    """The id is the AAD: a chunk file copied over another (both authentic) is caught."""
    repo, m = enc
    a, b = [c for c, _ in m.files[1].chunks if c != codec.ZERO_ID][:2]
    os.replace(repo.chunk_path(a), repo.chunk_path(b))
    with pytest.raises(IntegrityError):
        repo.read_chunk(b, CHUNK_SIZE)


def test_manifest_is_authenticated_and_bound_to_its_id(enc, tmp_path):
    repo, m = enc
    path = os.path.join(repo.snapshots_dir, m.id + ".json")
    os.rename(path, os.path.join(repo.snapshots_dir, "0123456789abcdef.json"))
    with pytest.raises(IntegrityError):
        repo.load("0123456789abcdef")
    os.rename(os.path.join(repo.snapshots_dir, "0123456789abcdef.json"), path)
    assert repo.load(m.id).id == m.id
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(IntegrityError):
        repo.load(m.id)
    assert repo.list() == [], "ls skips it"
    assert repo.verify()["bad"][0]["snapshot"] == m.id


def test_plain_store_is_unchanged(tmp_path):
    """A store made without a key is the format-1 store, readable by older gpusnap."""
    repo = Repository.open(str(tmp_path / "plain"))
    m = _snapshot(repo, write_images(str(tmp_path / "img"), {"pages-1.img": _data()}))
    config = json.load(open(os.path.join(repo.path, "config")))
    assert config["version"] == 1 and "encryption" not in config and config["hash"] == "sha256"
    raw = json.load(open(os.path.join(repo.snapshots_dir, m.id + ".json")))
    assert raw["name"] == "secret-name"
    cid = m.files[0].chunks[0][0]
    assert cid == codec.chunk_id(_data()[:CHUNK_SIZE])


# ---- archives --------------------------------------------------------------------------------

def _export(repo: Repository, sid: str) -> bytes:
    out = io.BytesIO()
    archive.export(repo, sid, out)
    return out.getvalue()


def test_encrypted_archive_stays_encrypted_and_imports_with_the_same_key(enc, key, tmp_path):
    repo, m = enc
    blob = _export(repo, m.id)
    assert b"gpusnap-secret-marker" not in blob and b"secret-name" not in blob
    dst = Repository.open(str(tmp_path / "b"), key_file=key)
    res = archive.import_(dst, io.BytesIO(blob))
    assert res.id == m.id and not res.already_present
    assert dst.load(m.id) == repo.load(m.id)
    assert dst.verify()["bad"] == []
    dst.materialise(dst.load(m.id), str(tmp_path / "out"))
    assert open(tmp_path / "out" / "pages-1.img", "rb").read() == _data()
    assert archive.import_(dst, io.BytesIO(blob)).already_present


def test_archives_do_not_cross_keys_or_kinds(enc, other_key, tmp_path):
    repo, m = enc
    blob = _export(repo, m.id)
    with pytest.raises(WrongKey):
        archive.import_(Repository.open(str(tmp_path / "k2"), key_file=other_key), io.BytesIO(blob))
    plain = Repository.open(str(tmp_path / "plain"))
    with pytest.raises(ArchiveError, match="encrypted"):
        archive.import_(plain, io.BytesIO(blob))
    pm = _snapshot(plain, write_images(str(tmp_path / "img2"), {"x.img": b"hello"}))
    with pytest.raises(ArchiveError, match="not encrypted"):
        archive.import_(repo, io.BytesIO(_export(plain, pm.id)))
    assert [s for s in repo.snapshot_ids()] == [m.id]


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_key_generate_and_key_file_option(tmp_path):
    runner = CliRunner()
    key = str(tmp_path / "k")
    res = runner.invoke(cli, ["--json", "key", "generate", key])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["fingerprint"]) == 16
    store = str(tmp_path / "s")
    Repository.open(store, key_file=key)        # a dump with --key-file creates it so
    res = runner.invoke(cli, ["--store", store, "--key-file", key, "--json", "ls"])
    assert res.exit_code == 0 and json.loads(res.output) == []
    res = runner.invoke(cli, ["--store", store, "--json", "ls"], env={"GPUSNAP_KEY_FILE": key})
    assert res.exit_code == 0
    try:
        main(["--store", store, "--json", "ls"])
    except SystemExit as exc:
        assert exc.code == WrongKey.exit_code == 46
    else:
        raise AssertionError("an encrypted store opened without a key must fail")


def test_wrong_key_has_its_own_exit_code():
    codes = [cls.exit_code for cls in ALL_ERRORS]
    assert WrongKey in ALL_ERRORS and len(codes) == len(set(codes))
