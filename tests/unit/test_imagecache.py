"""Warm caches: found only when complete and matching the manifest, kept per store."""

from __future__ import annotations

import dataclasses
import os

from gpusnap.engine import imagecache
from gpusnap.store import Repository

from conftest import commit_snapshot


def _snap(repo, tmp_path, data=b"x" * 5000):
    src = tmp_path / "img"
    src.mkdir(exist_ok=True)
    (src / "core-1.img").write_bytes(data)
    return repo.load(commit_snapshot(repo, str(src)).id)


def test_warm_lookup_and_drop(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUSNAP_WORKDIR", str(tmp_path / "work"))
    repo = Repository.open(str(tmp_path / "store"))
    m = _snap(repo, tmp_path)
    assert imagecache.lookup(repo.path, m) is None
    path = imagecache.warm(repo, m)
    assert open(os.path.join(path, "core-1.img"), "rb").read() == b"x" * 5000
    assert imagecache.lookup(repo.path, m) == path
    assert os.stat(os.path.dirname(imagecache.root(repo.path))).st_mode & 0o077 == 0

    changed = dataclasses.replace(m, files=[])
    assert imagecache.lookup(repo.path, changed) is None, "a cache for other files is not used"

    other = Repository.open(str(tmp_path / "other"))
    imagecache.drop(other.path, keep=set())
    assert imagecache.lookup(repo.path, m) == path, "another store's gc leaves this cache"
    assert imagecache.drop(repo.path, keep={m.id}) == []
    assert imagecache.drop(repo.path, [m.id]) == [m.id]
    assert imagecache.lookup(repo.path, m) is None
