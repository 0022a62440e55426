"""Warm caches: found only when complete and matching the manifest, kept per store."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from gpusnap.engine import imagecache, pagepath
from gpusnap.store import Repository

from conftest import commit_snapshot


def _snap(repo, tmp_path, data=b"x" * 5000, name="core-1.img"):
    src = tmp_path / "img"
    src.mkdir(exist_ok=True)
    (src / name).write_bytes(data)
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


def test_a_uffd_cache_holds_the_prepared_restore_and_is_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUSNAP_WORKDIR", str(tmp_path / "work"))
    repo = Repository.open(str(tmp_path / "store"))
    m = _snap(repo, tmp_path, b"y" * 7000, "files.img")
    assert imagecache.lookup_prepared(repo.path, m) is None
    images = imagecache.warm(repo, m, kind="uffd")
    prepared = imagecache.lookup_prepared(repo.path, m)
    assert prepared.images == images and prepared.tasks == 0 and prepared.items == []
    assert open(os.path.join(images, "files.img"), "rb").read() == b"y" * 7000
    assert imagecache.lookup(repo.path, m) is None, "the criu path's cache is another one"
    assert imagecache.warm(repo, m, kind="uffd") == images, "warm again: the same cache"

    changed = dataclasses.replace(m, files=[])
    assert imagecache.lookup_prepared(repo.path, changed) is None
    plan = os.path.join(os.path.dirname(images), imagecache.PLAN)
    with open(plan, "w") as f:
        f.write('{"tasks": 1, "items": [["../x", 1, []]], "stopped": []}')
    assert imagecache.lookup_prepared(repo.path, m) is None, "a bad plan is a miss"
    os.unlink(plan)
    assert imagecache.lookup_prepared(repo.path, m) is None
    assert imagecache.drop(repo.path, [m.id]) == [m.id]
    assert not os.path.exists(os.path.dirname(images))


def test_a_prepared_restore_survives_json_and_refuses_other_shapes():
    items = [("ab12", 8192, [(7, 0x10000, 0, 4096), (7, 0x30000, 4096, 4096)]), (None, 4096, [(8, 0x1000, 0, 4096)])]
    p = pagepath.Prepared("/img", 2, items, {8})
    back = pagepath.Prepared.from_json("/img", json.loads(json.dumps(p.to_json())))
    assert back == p
    for bad in ({"tasks": -1, "items": [], "stopped": []},
                {"tasks": 1, "items": [["ab", 1, [[1, 2, 3]]]], "stopped": []},
                {"tasks": 1, "items": [["ab", "1", []]], "stopped": []},
                {"tasks": 1, "items": [[7, 1, []]], "stopped": []},
                {"tasks": 1, "items": []},
                {"tasks": 1, "items": [["ab", 1, [[1, 2, 3, True]]]], "stopped": []},
                []):
        with pytest.raises(ValueError):
            pagepath.Prepared.from_json("/img", bad)
