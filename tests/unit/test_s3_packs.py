"""Pack files of the s3:// store (store/backends/packs.py): index objects checked as
untrusted input, packs cut mid-upload, two nodes storing one chunk twice, gc of packs
that still hold a used chunk, and restore workers fetching each pack once. A real S3
server process on 127.0.0.1 (tests/s3server.py)."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import commit_snapshot, write_images
from s3server import FaultProxy, s3_env, s3_server  # noqa: F401

from gpusnap.errors import StoreUnavailable
from gpusnap.store import Repository
from gpusnap.store.backends import for_location, packs

CID = ["%02x" % i * 32 for i in range(4)]


def _index(size, entries, version=1) -> bytes:
    return json.dumps({"version": version, "pack_size": size, "chunks": entries}).encode()


def test_an_index_round_trips():
    _data, pack, raw = packs.build([(CID[0], b"abc"), (CID[1], b"defg"), (CID[0], b"abc")])
    assert packs.decode_index(pack.id, raw) == pack
    assert pack.size == 7 and pack.chunks == {CID[0]: (0, 3), CID[1]: (3, 4)}


@pytest.mark.parametrize("raw,why", [
    (_index(10, [[CID[0], 8, 4]]), "outside the pack"),
    (_index(10, [[CID[0], 0, 6], [CID[1], 4, 2]]), "overlaps"),
    (_index(10, [[CID[0], 0, 2], [CID[0], 2, 2]]), "twice"),
    (_index(1 << 20, [[CID[0], i, 1] for i in range(packs.MAX_CHUNKS + 1)]), "at most"),
    (_index(10, [["../../etc/passwd", 0, 1]]), "malformed"),
    (_index(10, [[CID[0], -1, 1]]), "malformed"),
    (_index(10, [[CID[0], True, 1]]), "malformed"),
    (_index(10, [[CID[0], 0]]), "malformed"),
    (_index(-5, []), "pack_size"),
    (_index(1 << 40, []), "pack_size"),
    (_index(10, [], version=2), "version"),
    (b"[1, 2", "not JSON"),
    (b" " * (packs.MAX_INDEX_BYTES + 1), "bytes"),
])
def test_a_hostile_index_is_refused(raw, why):
    with pytest.raises(packs.BadIndex, match=why):
        packs.decode_index("ab" * 32, raw)


def test_a_hostile_index_object_hides_only_its_own_chunks(s3_env, s3_server):
    backend = for_location(f"s3://{s3_env}/hostile")
    backend.put_many([("chunks/00/" + CID[0], b"good chunk")])
    client = s3_server.client()
    bad_id = "ee" * 32
    client.put_object(Bucket=s3_env, Key=f"hostile/packs/ee/{bad_id}", Body=b"x" * 10)
    client.put_object(Bucket=s3_env, Key=f"hostile/index/{bad_id}",
                      Body=_index(10, [[CID[1], 5, 100]]))
    client.put_object(Bucket=s3_env, Key="hostile/index/not-a-pack-id", Body=b"{}")
    other = for_location(f"s3://{s3_env}/hostile")            # another node reads it
    assert dict(other.list("chunks/")) == {"chunks/00/" + CID[0]: 10}
    assert "outside the pack" in other.bad_indexes[bad_id]
    assert other.get("chunks/00/" + CID[0]) == b"good chunk"
    assert other.size("chunks/01/" + CID[1]) is None


def test_a_pack_cut_mid_upload_shows_no_chunk_and_a_retry_completes(s3_env, s3_server,
                                                                     monkeypatch):
    proxy = FaultProxy(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("GPUSNAP_S3_RETRIES", "2")
    url = f"s3://{s3_env}/cut"
    items = [(f"chunks/{c[:2]}/{c}", os.urandom(1 << 20)) for c in CID]
    try:
        proxy.cut_after(2 << 20)                    # the server goes mid-pack
        with pytest.raises(StoreUnavailable):
            for_location(url).put_many(items)
        proxy.restore()
        assert list(for_location(url).list("chunks/")) == []
        for_location(url).put_many(items)           # the retry
        fresh = for_location(url)
        assert sorted(fresh.list("chunks/")) == sorted((n, len(d)) for n, d in items)
        assert [fresh.get(n) for n, _d in items] == [d for _n, d in items]
    finally:
        proxy.close()


def test_a_pack_without_its_index_is_invisible_and_gc_takes_it(s3_env, s3_server):
    """A dump cut between the pack's PUT and its index's leaves a pack no chunk is read
    from; gc (stale_temps) removes it, and an index whose pack is gone."""
    url = f"s3://{s3_env}/half"
    data, pack, index = packs.build([(CID[2], b"orphan")])
    client = s3_server.client()
    client.put_object(Bucket=s3_env, Key=f"half/{packs.pack_name(pack.id)}", Body=data)
    client.put_object(Bucket=s3_env, Key="half/index/" + "cd" * 32, Body=_index(0, []))
    backend = for_location(url)
    assert backend.size(f"chunks/{CID[2][:2]}/{CID[2]}") is None
    stale = backend.stale_temps()
    assert stale == ["index/" + "cd" * 32, packs.pack_name(pack.id)]
    backend.delete_many(stale)
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_env, Prefix="half/")
            .get("Contents", [])] == []


def _images(tmp_path, tag: str, shared: bytes, own_mib: int = 2) -> str:
    return write_images(str(tmp_path / f"img-{tag}"), {"shared.img": shared,
                                                      "own.img": os.urandom(own_mib << 20)})


def _objects(s3_server, bucket: str, prefix: str) -> list[str]:
    out = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in out.get("Contents", [])]


def test_two_nodes_storing_one_chunk_twice_read_both_and_gc_stays_right(s3_env, s3_server,
                                                                        tmp_path):
    """Two nodes dumping shared.img at once both upload its chunks (each looked before
    the other's index was visible), so two packs hold them: both copies decode; gc keeps
    a pack while any chunk in it is used, and frees every pack once none is."""
    url = f"s3://{s3_env}/twice"
    shared = os.urandom(3 << 20)
    nodes = [Repository.open(url, cache=str(tmp_path / f"node-{i}")) for i in range(2)]
    snaps = []
    with nodes[0].shared_lock():
        snaps.append(commit_snapshot(nodes[0], _images(tmp_path, "0", shared)))
    ids = [cid for e in snaps[0].files if e.path == "shared.img" for cid, _n in e.chunks]
    # what node 1's racing dump uploads: the same chunks, in a pack of its own
    nodes[1].backend.put_many([(Repository.chunk_name(c), nodes[0].read_blob(c)) for c in ids])
    with nodes[1].shared_lock():
        snaps.append(commit_snapshot(nodes[1], _images(tmp_path, "1", shared)))
    sizes = {**snaps[0].chunk_sizes(), **snaps[1].chunk_sizes()}
    keys = _objects(s3_server, s3_env, "twice/packs/")
    assert len(keys) == 3 and len(list(nodes[1].backend.list("chunks/"))) == len(sizes)
    client = s3_server.client()
    for key in keys:                                        # each copy decodes
        pid = key.rsplit("/", 1)[-1]
        pack = packs.decode_index(pid, client.get_object(Bucket=s3_env, Key=f"twice/index/{pid}")
                                  ["Body"].read())
        data = client.get_object(Bucket=s3_env, Key=key)["Body"].read()
        for cid, (off, n) in pack.chunks.items():
            nodes[0].codec.decode(data[off:off + n], cid, sizes[cid])
    third = Repository.open(url, cache=str(tmp_path / "node-3"), create=False)
    with third.exclusive_lock():
        third.remove([snaps[0].id])
        plan = third.gc_plan()                  # node 0's pack holds shared.img: it stays
        assert plan["objects"] == [] and plan["kept"] > 0
        third.gc_execute(plan)
    last = Repository.open(url, cache=str(tmp_path / "node-4"), create=False)
    with last.shared_lock():
        last.materialise(last.load(snaps[1].id), str(tmp_path / "out"))
    with open(tmp_path / "out" / "shared.img", "rb") as f:
        assert f.read() == shared
    with last.exclusive_lock():
        last.remove([snaps[1].id])
        plan = last.gc_plan()
        assert len(plan["objects"]) == 6 and plan["kept"] == 0
        last.gc_execute(plan)
    assert _objects(s3_server, s3_env, "twice/packs/") == []
    assert _objects(s3_server, s3_env, "twice/index/") == []


def test_gc_keeps_a_pack_that_holds_a_used_chunk_and_frees_it_after(s3_env, s3_server,
                                                                    tmp_path):
    url = f"s3://{s3_env}/partial"
    repo = Repository.open(url, cache=str(tmp_path / "c"))
    shared = os.urandom(1 << 20)
    with repo.shared_lock():
        both = commit_snapshot(repo, _images(tmp_path, "a", shared, own_mib=1))
        only = commit_snapshot(repo, write_images(str(tmp_path / "img-b"), {"shared.img": shared}))
    assert only.bytes_new == 0 and len(_objects(s3_server, s3_env, "partial/packs/")) == 1
    with repo.exclusive_lock():
        repo.remove([both.id])
        plan = repo.gc_plan()
        assert plan["chunks"] == [] and plan["objects"] == [] and plan["bytes"] == 0
        assert plan["kept"] > 0                     # own.img's chunks, in the pack with shared's
        repo.gc_execute(plan)
    assert Repository.open(url, cache=str(tmp_path / "c2"), create=False).verify()["bad"] == []
    with repo.exclusive_lock():
        repo.remove([only.id])
        plan = repo.gc_plan()
        assert plan["kept"] == 0 and plan["bytes"] > 1 << 20
        repo.gc_execute(plan)
    assert _objects(s3_server, s3_env, "partial/packs/") == []
    assert _objects(s3_server, s3_env, "partial/index/") == []
    assert list(repo.backend.list("chunks/")) == []


def test_restore_workers_fetch_each_pack_once(s3_env, s3_server, tmp_path, monkeypatch):
    """Forked workers with 16 threads each read chunks of the same packs at once: one GET
    a pack (the others wait on its lock file in the cache, then read the cache)."""
    url = f"s3://{s3_env}/once"
    src = write_images(str(tmp_path / "img"), {"pages-1.img": os.urandom(40 << 20)})
    repo = Repository.open(url, cache=str(tmp_path / "c"))
    with repo.shared_lock():
        snap = commit_snapshot(repo, src)
    proxy = FaultProxy(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("GPUSNAP_THREADS", "4")
    try:
        node = Repository.open(url, cache=str(tmp_path / "empty"), create=False)
        with node.shared_lock():
            node.materialise(node.load(snap.id), str(tmp_path / "out"))
        gets = [line for line in proxy.lines if re.match(r"GET \S*/once/packs/", line)]
    finally:
        proxy.close()
    stored = _objects(s3_server, s3_env, "once/packs/")
    assert len(stored) >= 3 and len(gets) == len(set(gets)) == len(stored), gets
    with open(tmp_path / "out" / "pages-1.img", "rb") as a, open(f"{src}/pages-1.img", "rb") as b:
        assert a.read() == b.read()


def _packed(backend, n: int) -> list[str]:
    """n packs of one chunk each; their chunk names."""
    names = []
    for _ in range(n):
        cid = os.urandom(32).hex()
        names.append(f"chunks/{cid[:2]}/{cid}")
        backend.put_many([(names[-1], os.urandom(64))])
    return names


@pytest.mark.parametrize("raw,why", [
    (b'{"version": 1, "packs": [{"id": "zz", "pack_size": 0, "chunks": []}]}', "not a pack id"),
    (b'{"version": 2, "packs": []}', "version"),
    (b'{"version": 1, "packs": [7]}', "malformed"),
    (json.dumps({"version": 1, "packs": [{"id": "ab" * 32, "pack_size": 4,
                                          "chunks": [[CID[0], 2, 4]]}]}).encode(), "outside"),
])
def test_a_hostile_bundle_is_refused(raw, why):
    with pytest.raises(packs.BadIndex, match=why):
        packs.decode_bundle(raw)


def test_a_commit_bundles_the_indexes_a_fresh_node_then_reads_at_once(s3_env, s3_server, tmp_path,
                                                                      monkeypatch):
    """sync() (commit) writes one bundle for the snapshot's packs; a node with an empty
    cache reads that instead of an index object a pack; a bundle that does not match its
    id is ignored; gc removes a bundle once its packs are gone."""
    from gpusnap.store.backends.s3 import S3Backend
    from gpusnap.store.cache import ChunkCache
    url = f"s3://{s3_env}/bundled"
    writer = for_location(url)
    names = _packed(writer, 12)
    writer.sync(names)
    writer.sync(names)                              # already bundled: no second bundle
    assert len(_objects(s3_server, s3_env, "bundled/bundles/")) == 1
    s3_server.client().put_object(Bucket=s3_env, Key="bundled/bundles/" + "ab" * 32, Body=b"{}")
    proxy = FaultProxy(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        node = S3Backend(url, ChunkCache(str(tmp_path / "c")).open())
        assert sorted(n for n, _s in node.list("chunks/")) == sorted(names)
        assert [node.get(n) for n in names[:2]] == [writer.get(n) for n in names[:2]]
        fetched = [line.split()[1] for line in proxy.lines if line.startswith("GET")]
    finally:
        proxy.close()
    assert not [p for p in fetched if "/bundled/index/" in p], fetched
    assert len([p for p in fetched if "/bundled/bundles/" in p]) == 2     # the good, the bad
    assert "does not match" in node.bad_indexes["bundle-" + "ab" * 32]
    writer.delete_many(names)
    assert sorted(writer.stale_temps()) == sorted(f"bundles/{b}" for b in [
        o.rsplit("/", 1)[-1] for o in _objects(s3_server, s3_env, "bundled/bundles/")])
