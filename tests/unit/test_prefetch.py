"""Packs fetched ahead of a restore's reads (store/backends/prefetch.py): the order and
budget as pure logic; the helper process against a real S3 server on 127.0.0.1
(tests/s3server.py): every pack of a snapshot in the cache once, each fetched once, the
reads then served from the cache, and the helper gone when the block ends, also when it
is stopped midway."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import psutil
import pytest
from conftest import commit_snapshot, write_images
from s3server import s3_env, s3_server  # noqa: F401

from gpusnap import hostcpu
from gpusnap.store import Repository
from gpusnap.store.backends import prefetch


@dataclass(frozen=True)
class P:
    id: str
    size: int


PACKS = {"a": P("A", 10), "b": P("B", 20), "c": P("C", 30)}


def _order(names, budget=100, cached=()):
    return [p.id for p in prefetch.order(names, PACKS.get, lambda p, n: n not in cached, budget)]


def test_packs_come_once_each_in_the_order_of_their_first_chunk():
    assert _order(["b", "a", "b", "c", "a"]) == ["B", "A", "C"]


def test_unknown_chunks_and_packs_not_wanted_are_left_out():
    assert _order(["x", "a", "b", "c"], cached={"b"}) == ["A", "C"]


def test_a_pack_not_wanted_at_its_first_chunk_is_not_asked_again():
    asked = []
    out = prefetch.order(["a", "a", "b"], PACKS.get, lambda p, n: asked.append(p.id) or p.id == "B", 100)
    assert [p.id for p in out] == ["B"] and asked == ["A", "B"]


def test_the_budget_ends_the_list():
    assert _order(["a", "b", "c"], budget=30) == ["A", "B"]
    assert _order(["c", "a"], budget=29) == []


def test_nothing_to_fetch_starts_no_helper():
    assert prefetch.start(lambda p: None, [], 4) is None


_PROXY = """
import sys
from s3server import FaultProxy
proxy = FaultProxy(int(sys.argv[1]))
print(proxy.endpoint, flush=True)
for _ in sys.stdin:
    print(*proxy.lines, "END", sep="\\n", flush=True)
proxy.close()
"""


class ProxyProcess:
    """tests/s3server.py's FaultProxy in a process of its own (its threads in this one
    would stop the helper from forking); lines() gives the requests' first lines so far."""

    def __init__(self, port: int):
        self.proc = subprocess.Popen([sys.executable, "-c", _PROXY, str(port)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=os.path.dirname(os.path.dirname(__file__)))
        self.endpoint = self.proc.stdout.readline().strip()

    def lines(self) -> list[str]:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return list(iter(self.proc.stdout.readline, "END\n"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children() if c.status() != psutil.STATUS_ZOMBIE}


def _snapshot(url, tmp_path, mib=48):
    src = write_images(str(tmp_path / "img"), {"pages-1.img": os.urandom(mib << 20),
                                                "core-1.img": os.urandom(5000)})
    repo = Repository.open(url, cache=str(tmp_path / "c"))
    with repo.shared_lock():
        return commit_snapshot(repo, src), src


def test_helper_processes_default_to_one_for_four_cpus(monkeypatch):
    monkeypatch.delenv("GPUSNAP_S3_PREFETCH_PROCS", raising=False)
    monkeypatch.setattr(hostcpu, "count", lambda: 16)
    assert prefetch.procs(packs=100, workers=16) == 4
    assert prefetch.procs(packs=2, workers=16) == 2
    assert prefetch.procs(packs=100, workers=3) == 3
    monkeypatch.setattr(hostcpu, "count", lambda: 2)
    assert prefetch.procs(packs=100, workers=16) == 1
    monkeypatch.setattr(hostcpu, "count", lambda: 128)
    assert prefetch.procs(packs=100, workers=16) == 8
    for bad in ("0", "x", ""):
        monkeypatch.setenv("GPUSNAP_S3_PREFETCH_PROCS", bad)
        assert prefetch.procs(packs=100, workers=16) == 8
    monkeypatch.setenv("GPUSNAP_S3_PREFETCH_PROCS", "5")
    assert prefetch.procs(packs=100, workers=16) == 5


@pytest.mark.parametrize("procs", ["1", "3"])
def test_a_snapshots_packs_come_into_the_cache_once_each(s3_env, s3_server, tmp_path, monkeypatch,
                                                         procs):
    url = f"s3://{s3_env}/ahead{procs}"
    snap, src = _snapshot(url, tmp_path)
    proxy = ProxyProcess(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("GPUSNAP_S3_PREFETCH_PROCS", procs)
    try:
        node = Repository.open(url, cache=str(tmp_path / "empty"), create=False)
        cids = [cid for f in snap.files for cid, _n in f.chunks]
        assert threading.active_count() == 1, threading.enumerate()
        before = _children() - {proxy.proc.pid}
        with node.shared_lock():
            locked = _children() - {proxy.proc.pid}
            with node.prefetch(node.load(snap.id), ["core-1.img"]) as ahead:
                helpers = _children() - locked - {proxy.proc.pid}
                assert len(helpers) == int(procs) == len(ahead.pids), helpers
                deadline = time.monotonic() + 60
                while not all(node.backend.in_cache(c) for c in cids):
                    assert time.monotonic() < deadline, "the helper did not fetch every chunk"
                    time.sleep(0.05)
                gets = [line for line in proxy.lines() if re.match(rf"GET \S*/ahead{procs}/packs/", line)]
                node.materialise(node.load(snap.id), str(tmp_path / "out"))
                after = [line for line in proxy.lines() if re.match(rf"GET \S*/ahead{procs}/packs/", line)]
        assert _children() - {proxy.proc.pid} == before
    finally:
        proxy.close()
    assert len(gets) >= 3 and len(gets) == len(set(gets)), gets
    assert after == gets, "the reads fetched again what the helper fetched"
    with open(tmp_path / "out" / "pages-1.img", "rb") as a, open(f"{src}/pages-1.img", "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("procs", ["1", "2"])
def test_a_helper_stopped_midway_goes_and_leaves_no_temp_file(s3_env, s3_server, tmp_path,
                                                              monkeypatch, procs):
    url = f"s3://{s3_env}/stopped{procs}"
    snap, _src = _snapshot(url, tmp_path, mib=96)
    monkeypatch.setenv("GPUSNAP_S3_CONCURRENCY", procs)
    monkeypatch.setenv("GPUSNAP_S3_PREFETCH_PROCS", procs)
    node = Repository.open(url, cache=str(tmp_path / "empty"), create=False)
    before = _children()
    t = time.monotonic()
    with node.shared_lock(), node.prefetch(node.load(snap.id)):
        pass
    assert time.monotonic() - t < prefetch.STOP_WAIT + 5
    assert _children() == before
    cache_tmp = [os.path.join(d, n) for d, _s, names in os.walk(tmp_path / "empty")
                 for n in names if os.path.basename(d) == "tmp" or "." in n]
    assert cache_tmp == []


def test_a_local_store_prefetches_nothing(tmp_path):
    src = write_images(str(tmp_path / "img"), {"pages-1.img": os.urandom(1 << 20)})
    repo = Repository.open(str(tmp_path / "store"))
    with repo.shared_lock():
        snap = commit_snapshot(repo, src)
    before = _children()
    with repo.prefetch(snap):
        assert _children() == before


def test_no_helper_is_forked_while_another_thread_runs(s3_env, s3_server, tmp_path):
    url = f"s3://{s3_env}/threaded"
    snap, _src = _snapshot(url, tmp_path, mib=8)
    node = Repository.open(url, cache=str(tmp_path / "empty"), create=False)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        before = _children()
        with node.prefetch(node.load(snap.id)):
            assert _children() == before
    finally:
        stop.set()
        other.join()


def test_finish_waits_for_every_chunk(s3_env, s3_server, tmp_path):
    """What `gpusnap warm` of a remote store's snapshot relies on."""
    url = f"s3://{s3_env}/finish"
    snap, _src = _snapshot(url, tmp_path, mib=40)
    node = Repository.open(url, cache=str(tmp_path / "empty"), create=False)
    before = _children()
    with node.prefetch(node.load(snap.id), finish=True):
        pass
    assert _children() == before
    assert all(node.backend.in_cache(cid) for f in snap.files for cid, _n in f.chunks)
