"""Snapshot names (a series, newest by commit sequence), ls filters, forget --keep-last."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gpusnap.cli import cli
from gpusnap.errors import UsageError
from gpusnap.model import Manifest, Target
from gpusnap.store import Repository
from gpusnap.store.repository import validate_name


def _snap(repo, tmp_path, name, kind="process", data=b"x", created="2026-01-01T00:00:00+00:00"):
    src = tmp_path / f"img-{data.hex()}"
    src.mkdir(exist_ok=True)
    (src / "core-1.img").write_bytes(data * 1000)
    files, counts = repo.ingest_dir(str(src))
    return repo.commit(Manifest(name=name, created=created, target=Target(kind, 9, [9]), pids=[9],
                                criu_version="4.2.1", kernel="6", files=files, **counts))


@pytest.fixture
def repo(tmp_path):
    return Repository.open(str(tmp_path / "store"))


def test_newest_is_by_sequence_not_clock(repo, tmp_path):
    """Same second (or a clock that went back): the later commit is still the newest."""
    first = _snap(repo, tmp_path, "web", data=b"a", created="2026-01-01T00:00:05+00:00")
    second = _snap(repo, tmp_path, "web", data=b"b", created="2026-01-01T00:00:01+00:00")
    assert repo.load(second).seq == repo.load(first).seq + 1
    assert repo.resolve("web") == second
    assert [s.id for s in repo.list()] == [first, second]


@pytest.mark.parametrize("bad", ["", "cafe", "0123", "-x", "a b", "x/y"])
def test_names_refused(bad):
    with pytest.raises(UsageError):
        validate_name(bad)


def test_names_accepted():
    for good in ("web", "llm-8b", "v1.2", "Cafe", "job@host"):
        assert validate_name(good) == good


def test_resolve_order_id_name_prefix(repo, tmp_path):
    sid = _snap(repo, tmp_path, "web")
    assert repo.resolve(sid) == sid and repo.resolve(sid[:6]) == sid and repo.resolve("web") == sid
    with pytest.raises(UsageError):
        repo.resolve("")


def test_dump_refuses_an_empty_name(tmp_path):
    res = CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), "dump", "--pid", "2", "--name", ""])
    assert isinstance(res.exception, UsageError)


def test_ls_filters(repo, tmp_path):
    a = _snap(repo, tmp_path, "web", data=b"a")
    b = _snap(repo, tmp_path, "db", kind="docker", data=b"b")
    c = _snap(repo, tmp_path, "web", data=b"c")
    run = lambda *args: [s["id"] for s in json.loads(CliRunner().invoke(
        cli, ["--store", repo.path, "ls", "--json", *args]).output)]
    assert run() == [a, b, c]
    assert run("--name", "web") == [a, c]
    assert run("--kind", "docker") == [b]
    assert run("--latest", "2") == [b, c]
    assert run("--name", "web", "--latest", "1") == [c]


def test_forget_keep_last(repo, tmp_path):
    web = [_snap(repo, tmp_path, "web", data=bytes([1 + i])) for i in range(3)]
    db = [_snap(repo, tmp_path, "db", data=bytes([10 + i])) for i in range(2)]
    runner = CliRunner()
    dry = json.loads(runner.invoke(cli, ["--store", repo.path, "forget", "--keep-last", "1",
                                         "--dry-run", "--json"]).output)
    assert sorted(dry["forget"]) == sorted(web[:2] + db[:1]) and dry["gc"]["chunks"] == 3
    assert len(repo.snapshot_ids()) == 5                       # nothing changed
    res = json.loads(runner.invoke(cli, ["--store", repo.path, "forget", "--keep-last", "2",
                                         "--name", "web", "--json"]).output)
    assert res["forget"] == [web[0]] and res["gc"]["chunks"] == 1
    assert sorted(repo.snapshot_ids()) == sorted(web[1:] + db)
    assert repo.verify()["bad"] == []


def test_compress_level_of_new_chunks(tmp_path):
    """--compress: the level changes stored sizes, never chunk ids (dedup is on plain bytes)."""
    from gpusnap.store import codec
    sizes, ids = {}, {}
    for level in (codec.NO_COMPRESSION, 1, 19):
        repo = Repository.open(str(tmp_path / f"s{level}"))
        repo.compress_level = level
        src = tmp_path / f"img{level}"
        src.mkdir()
        (src / "pages-1.img").write_bytes(b"gpusnap compresses this " * 40000)
        files, counts = repo.ingest_dir(str(src))
        sizes[level], ids[level] = counts["bytes_stored"], [c for c, _ in files[0].chunks]
        cid, n = files[0].chunks[0]
        assert repo.read_chunk(cid, n) == (b"gpusnap compresses this " * 40000)[:n]
    assert ids[codec.NO_COMPRESSION] == ids[1] == ids[19]
    assert sizes[codec.NO_COMPRESSION] > sizes[1] >= sizes[19]
