"""A store in a real S3 server (moto's server mode on 127.0.0.1): the repository, its
cache, copy between stores, the CLI's errors and faults (throttling, a server that
vanishes mid-transfer, a cache whose disk fills)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from conftest import REPO, commit_snapshot, write_images
from s3server import FaultProxy, s3_env, s3_server  # noqa: F401

from gpusnap.errors import StoreUnavailable
from gpusnap.store import Repository, cache, transfer


def _images(tmp_path, mib=6, seed=b"a"):
    data = os.urandom(mib << 20)                    # incompressible: stored ~ logical
    return write_images(str(tmp_path / f"img-{seed.decode()}"),
                        {"pages-1.img": data + bytes(1 << 20), "core-1.img": seed * 3000,
                         "files.img": hashlib.sha256(b"same").digest() * (1 << 15)})


def _dump(repo, src):
    with repo.shared_lock():
        m = commit_snapshot(repo, src)
    return {"id": m.id, "bytes_logical": m.bytes_logical, "bytes_stored": m.bytes_stored,
            "bytes_new": m.bytes_new}


def _same_tree(a, b):
    for name in os.listdir(a):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def test_round_trip_into_an_empty_cache_and_dedup(s3_env, tmp_path):
    url = f"s3://{s3_env}/fleet"
    src = _images(tmp_path)
    node_a = Repository.open(url, cache=str(tmp_path / "cache-a"))
    first = _dump(node_a, src)
    assert first["bytes_new"] == first["bytes_stored"] > 0
    again = _dump(node_a, src)
    assert again["bytes_new"] == 0 and again["bytes_stored"] == first["bytes_stored"]
    node_b = Repository.open(url, cache=str(tmp_path / "cache-b"), create=False)
    assert {s.id for s in node_b.list()} == {first["id"], again["id"]}
    with node_b.shared_lock():
        node_b.materialise(node_b.load(first["id"]), str(tmp_path / "out"))
    _same_tree(src, str(tmp_path / "out"))
    cached = cache.ChunkCache(node_b.path).usage()
    assert cached == first["bytes_stored"]            # what it read, verified, is cached
    assert node_b.verify()["bad"] == []


def test_a_restore_lists_the_packs_once_and_still_finds_a_chunk_stored_after(s3_env, tmp_path,
                                                                             monkeypatch):
    """The prefetch, materialise and the fill each ask for the snapshot's chunks before
    their workers fork: index/ is listed (and its indexes decoded) once while the table
    knows them all; a snapshot whose chunks came later lists again, and reads right."""
    url = f"s3://{s3_env}/once"
    first = _dump(Repository.open(url, cache=str(tmp_path / "a")), _images(tmp_path, mib=2))
    node = Repository.open(url, cache=str(tmp_path / "b"), create=False)
    listings = []
    real = node.backend._refresh_packs
    monkeypatch.setattr(node.backend, "_refresh_packs", lambda: listings.append(1) or real())
    m = node.load(first["id"])
    cids = [cid for f in m.files for cid, _n in f.chunks]
    for _ in range(3):
        node.prepare_reads(cids)
    assert len(listings) == 1
    later = _dump(Repository.open(url, cache=str(tmp_path / "a")),
                  _images(tmp_path, mib=2, seed=b"b"))
    with node.shared_lock():
        node.materialise(node.load(later["id"]), str(tmp_path / "out"))
    assert len(listings) == 2
    _same_tree(str(tmp_path / "img-b"), str(tmp_path / "out"))
    node.prepare_reads()                    # no chunks named: a fresh listing
    assert len(listings) == 3


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_torn_pack_in_the_cache_is_read_from_the_store_again(s3_env, tmp_path, damage):
    """The cache is not fsynced: after a host's crash a kept pack may hold garbage or end
    early. A restore then reads those chunks from the store (and drops the pack) rather
    than failing on every restore of the node; verify says the store is sound."""
    url = f"s3://{s3_env}/torn-{damage}"
    src = _images(tmp_path, mib=4)
    snap = _dump(Repository.open(url, cache=str(tmp_path / "a")), src)
    node = Repository.open(url, cache=str(tmp_path / "b"), create=False)
    with node.shared_lock():
        node.materialise(node.load(snap["id"]), str(tmp_path / "first"))
    kept = [os.path.join(d, f) for d, _s, fs in os.walk(cache.ChunkCache(node.path).packs)
            for f in fs]
    assert kept
    for path in kept:
        with open(path, "r+b") as f:
            if damage == "truncate":
                f.truncate(os.path.getsize(path) // 2)
            else:
                f.seek(os.path.getsize(path) // 2)
                f.write(b"\xff" * 4096)
    again = Repository.open(url, cache=str(tmp_path / "b"), create=False)
    with again.shared_lock():
        again.materialise(again.load(snap["id"]), str(tmp_path / "second"))
    _same_tree(src, str(tmp_path / "second"))
    assert again.verify()["bad"] == []


def test_an_encrypted_store_shows_no_plain_hash_and_no_key(s3_env, s3_server, tmp_path):
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    url = f"s3://{s3_env}/secret"
    src = _images(tmp_path)
    repo = Repository.open(url, cache=str(tmp_path / "c"), key_file=str(key))
    counts = _dump(repo, src)
    objects = {o["Key"]: o for o in s3_server.client().list_objects_v2(Bucket=s3_env)["Contents"]}
    with open(os.path.join(src, "core-1.img"), "rb") as f:
        plain_id = hashlib.sha256(f.read()).hexdigest()
    assert not any(plain_id in k for k in objects)
    body = b"".join(s3_server.client().get_object(Bucket=s3_env, Key=k)["Body"].read()
                    for k in objects)
    assert key.read_text().strip().encode() not in body and b"pages-1.img" not in body
    other = Repository.open(url, cache=str(tmp_path / "c2"), key_file=str(key), create=False)
    with other.shared_lock():
        other.materialise(other.load(counts["id"]), str(tmp_path / "out"))
    _same_tree(src, str(tmp_path / "out"))


def test_copy_sends_only_missing_chunks_both_ways(s3_env, tmp_path):
    local = Repository.open(str(tmp_path / "local"))
    remote = Repository.open(f"s3://{s3_env}/copy", cache=str(tmp_path / "c"))
    a = _dump(local, _images(tmp_path, seed=b"a"))
    b = _dump(local, _images(tmp_path, seed=b"b"))
    with local.shared_lock(), remote.shared_lock():
        one = transfer.copy_snapshot(local, remote, a["id"])
        two = transfer.copy_snapshot(local, remote, b["id"])
        again = transfer.copy_snapshot(local, remote, a["id"])
    assert one["chunks_copied"] > 0 and one["bytes_copied"] == a["bytes_stored"]
    assert two["chunks_present"] > 0                 # files.img: a's copy is reused
    assert again["already_present"]
    back = Repository.open(str(tmp_path / "back"))
    with remote.shared_lock(), back.shared_lock():
        transfer.copy_snapshot(remote, back, b["id"])
    assert back.verify()["bad"] == []
    with back.shared_lock():
        back.materialise(back.load(b["id"]), str(tmp_path / "out"))
    _same_tree(str(tmp_path / "img-b"), str(tmp_path / "out"))


def test_throttling_is_retried_with_backoff(s3_env, s3_server, tmp_path, monkeypatch):
    proxy = FaultProxy(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        repo = Repository.open(f"s3://{s3_env}/slow", cache=str(tmp_path / "c"))
        proxy.fail_next(3)                          # 503 SlowDown three times in a row
        counts = _dump(repo, _images(tmp_path))
        assert proxy.failed == 3 and counts["bytes_new"] > 0
        assert [s.id for s in repo.list()] == [counts["id"]]
    finally:
        proxy.close()


def test_opening_a_store_and_loading_a_snapshot_by_id_is_two_requests(s3_env, s3_server, tmp_path,
                                                                     monkeypatch):
    """A restore's planning: the config's GET (which also says the bucket is there and the
    credentials work) and the manifest's GET, nothing else; a new store still gets its
    config, and the first config written is the one every opener reads."""
    url = f"s3://{s3_env}/plan"
    snap = _dump(Repository.open(url, cache=str(tmp_path / "c")), _images(tmp_path, mib=1))
    proxy = FaultProxy(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        repo = Repository.open(url, cache=str(tmp_path / "c2"), create=False)
        assert repo.load_ref(snap["id"]).id == snap["id"]
        assert [line.split()[:2] for line in proxy.lines] == [
            ["GET", f"/{s3_env}/plan/config"], ["GET", f"/{s3_env}/plan/snapshots/{snap['id']}.json"]]
        fresh = Repository.open(f"s3://{s3_env}/new", cache=str(tmp_path / "c3"))
        again = Repository.open(f"s3://{s3_env}/new", cache=str(tmp_path / "c4"), create=False)
        assert fresh.backend.get("config") == again.backend.get("config")
        assert again.backend.size("config") == len(again.backend.get("config"))
    finally:
        proxy.close()


def test_clients_come_from_one_botocore_session_a_process_tree_without_boto3(tmp_path):
    """The first client freezes what is in memory out of the collector's sight; a forked
    worker's client comes from the same session (nothing here reaches a server)."""
    code = """if True:
        import gc, os, sys
        from gpusnap.store.backends import s3
        b = s3.S3Backend("s3://bucket/prefix")
        first = b.client()
        assert "boto3" not in sys.modules and gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        pid = os.fork()
        if pid == 0:
            ok = b.client() is not first and len(s3._sessions) == 1
            os._exit(0 if ok and gc.get_freeze_count() <= frozen else 1)
        assert os.waitpid(pid, 0)[1] == 0 and b.client() is first
        """
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_CONFIG_FILE": "/nonexistent"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_listing_longer_than_a_page_comes_whole(s3_env, monkeypatch):
    from gpusnap.store.backends.s3 import S3Backend
    monkeypatch.setattr(S3Backend, "LIST_PAGE", 2)
    backend = S3Backend(f"s3://{s3_env}/pages")
    names = {f"snapshots/{i:02d}.json": i + 1 for i in range(5)}
    for name, size in names.items():
        backend.put(name, bytes(size))
    backend.put("config", b"{}")
    assert dict(backend.list("snapshots/")) == names
    assert [n for n, _s, _m in backend.list_meta("config")] == ["config"]
    assert list(backend.list("nothing/")) == []


def test_server_gone_mid_upload_then_mid_download_then_retries(s3_env, s3_server, tmp_path,
                                                               monkeypatch):
    """No partial snapshot is visible after a cut dump; the retry sends only what is
    missing (the packs whose index made it: one worker, so the first 16 MiB batch's pack
    and index are in before the cut); a cut restore fails cleanly and its retry completes."""
    proxy = FaultProxy(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("GPUSNAP_S3_RETRIES", "2")
    monkeypatch.setenv("GPUSNAP_THREADS", "1")
    try:
        url = f"s3://{s3_env}/cut"
        repo = Repository.open(url, cache=str(tmp_path / "c"))
        src = _images(tmp_path, mib=40)
        proxy.cut_after(20 << 20)
        with pytest.raises(StoreUnavailable):
            _dump(repo, src)
        proxy.restore()
        assert repo.list() == []
        counts = _dump(Repository.open(url, cache=str(tmp_path / "c")), src)
        assert 0 < counts["bytes_new"] < counts["bytes_stored"]     # the first part stayed
        fresh = Repository.open(url, cache=str(tmp_path / "empty"), create=False)
        proxy.cut_after(2 << 20)
        with pytest.raises(StoreUnavailable):
            with fresh.shared_lock():
                fresh.materialise(fresh.load(counts["id"]), str(tmp_path / "out1"))
        proxy.restore()
        fresh = Repository.open(url, cache=str(tmp_path / "empty"), create=False)
        with fresh.shared_lock():
            fresh.materialise(fresh.load(counts["id"]), str(tmp_path / "out2"))
        _same_tree(src, str(tmp_path / "out2"))
    finally:
        proxy.close()


def test_cache_evicts_least_recently_used_to_its_bound(tmp_path):
    c = cache.ChunkCache(str(tmp_path / "c"), max_bytes=10_000).open()
    ids = [f"{i:02x}" * 32 for i in range(5)]
    for i in range(3):
        assert c.put(ids[i], b"x" * 3000)
        os.utime(c.path(ids[i]), (i, i))            # put order = use order
    assert c.get(ids[0]) == b"x" * 3000             # used again: newest now
    c.put(ids[3], b"x" * 3000)                      # over the bound: 1 goes, then 2
    c.put(ids[4], b"x" * 3000)
    assert c.usage() <= 10_000
    assert [c.has(i) for i in ids] == [True, False, False, True, True]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (root)")
def test_a_cache_that_fills_its_disk_does_not_fail_the_restore(s3_env, tmp_path):
    src = _images(tmp_path, mib=8)
    counts = _dump(Repository.open(f"s3://{s3_env}/full", cache=str(tmp_path / "c")), src)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(small)], check=True)
    try:
        repo = Repository.open(f"s3://{s3_env}/full", cache=str(small), cache_size="1G",
                               create=False)
        with repo.shared_lock():
            repo.materialise(repo.load(counts["id"]), str(tmp_path / "out"))
        _same_tree(src, str(tmp_path / "out"))
        assert cache.ChunkCache(repo.path).usage() < 1 << 20
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _cli(env, *args):
    import json
    import sys
    proc = subprocess.run([sys.executable, "-m", "gpusnap", "--json", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None, proc.stderr


def test_wrong_credentials_and_missing_bucket_are_clear(s3_env, s3_server, tmp_path):
    env = {"GPUSNAP_CACHE": str(tmp_path / "c"), "GPUSNAP_STORE": f"s3://{s3_env}/x"}
    rc, out, err = _cli({**env, "AWS_SECRET_ACCESS_KEY": "wrong"}, "ls")
    assert rc == 47 and out["error"] == "StoreDenied", err
    rc, out, err = _cli({**env, "GPUSNAP_STORE": "s3://no-such-bucket-here/x"}, "ls")
    assert rc == 40 and "bucket" in out["message"] and "does not exist" in out["message"], err
    rc, out, err = _cli(env, "ls")
    assert rc == 0 and out == []


def test_cli_copy_then_ls_and_verify_on_the_bucket(s3_env, tmp_path):
    local = str(tmp_path / "local")
    snap = _dump(Repository.open(local), _images(tmp_path))
    env = {"GPUSNAP_CACHE": str(tmp_path / "c"), "GPUSNAP_STORE": local}
    url = f"s3://{s3_env}/copied"
    rc, out, err = _cli(env, "copy", snap["id"], "--to", url)
    assert rc == 0 and out[0]["chunks_copied"] > 0, err
    rc, out, err = _cli(env, "copy", snap["id"], "--to", url)
    assert rc == 0 and out[0]["already_present"], err
    rc, out, err = _cli({**env, "GPUSNAP_STORE": url}, "ls")
    assert rc == 0 and [s["id"] for s in out] == [snap["id"]], err
    rc, out, err = _cli({**env, "GPUSNAP_STORE": url}, "verify")
    assert rc == 0 and out["bad"] == [], err


_COMMITTER = """
import os, sys, time
sys.path.insert(0, os.path.join({repo!r}, "tests"))
from conftest import commit_snapshot
from gpusnap.store import Repository
url, cache, src, go, n = sys.argv[1:6]
repo = Repository.open(url, cache=cache, create=False)
while not os.path.exists(go):
    time.sleep(0.005)
for _ in range(int(n)):
    with repo.shared_lock():
        commit_snapshot(repo, src, name="series")
"""


def test_two_nodes_committing_at_once_never_share_a_sequence_number(s3_env, s3_server, tmp_path):
    """Two processes (separate caches) commit snapshots of one name at the same moments;
    every commit gets its own number and both nodes agree which is newest."""
    from conftest import REPO
    url = f"s3://{s3_env}/race"
    src = write_images(str(tmp_path / "img"), {"pages-1.img": b"p" * 5000})
    Repository.open(url, cache=str(tmp_path / "c0"))
    go = str(tmp_path / "go")
    env = {**os.environ, **s3_server.env()}
    procs = [subprocess.Popen([sys.executable, "-c", _COMMITTER.format(repo=REPO), url,
                               str(tmp_path / f"node-{i}"), src, go, "8"],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    open(go, "w").close()
    for p in procs:
        assert p.wait(240) == 0, p.stderr.read()
        p.stderr.close()
    nodes = [Repository.open(url, cache=str(tmp_path / f"node-{i}"), create=False) for i in range(2)]
    seqs = sorted(m.seq for m in nodes[0].manifests())
    assert seqs == list(range(1, 17)), seqs
    newest = [n.resolve("series") for n in nodes]
    assert newest[0] == newest[1] == nodes[0].manifests()[-1].id
    with nodes[0].exclusive_lock():             # gc keeps only the highest claim
        nodes[0].gc_execute(nodes[0].gc_plan())
    assert [n for n, _s in nodes[0].backend.list("seq/")] == ["seq/000000000016"]
    with nodes[1].shared_lock():
        assert commit_snapshot(nodes[1], src).seq == 17
