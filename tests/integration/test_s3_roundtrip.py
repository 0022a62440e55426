"""Real CRIU with an s3:// store on a real S3 server (moto on 127.0.0.1): a process tree
dumped by one "node" and restored by another with an empty cache; two nodes (separate
caches) dumping and collecting garbage at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, wait_pids_free
from s3server import s3_env, s3_server  # noqa: F401

pytestmark = [pytest.mark.root]


def _node(s3_server, store: str, cache: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, **s3_server.env(), "GPUSNAP_STORE": store, "GPUSNAP_CACHE": cache}
    return subprocess.Popen([sys.executable, "-m", "gpusnap", "--json", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(proc: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, json.loads(out) if out.strip() else None, err


def test_dump_on_one_node_restore_on_another_from_an_empty_cache(workload, s3_server, s3_env, tmp_path):
    store = f"s3://{s3_env}/fleet"
    w = workload("--mib", "64", "--children", "1", "--threads", "1")
    before = w.report()
    rc, dumped, err = _done(_node(s3_server, store, str(tmp_path / "node-a"), "dump", "--pid",
                                  str(w.pid), "--name", "tree"))
    assert rc == 0, err
    assert dumped["bytes_logical"] >= 64 << 20
    assert dumped["bytes_new"] == dumped["bytes_stored"] > 0
    w.reap()
    wait_pids_free(w.pids)

    empty = tmp_path / "node-b"
    rc, out, err = _done(_node(s3_server, store, str(empty), "restore", "tree"))
    assert rc == 0, err
    assert out["pid"] == w.pid
    assert any("fetched ahead" in n for n in out["notes"]), out["notes"]
    after = w.report()
    assert after["data_ok"] and after["children_ok"] and after["ticks"] >= before["ticks"], after
    # the pull-through cache now holds what the restore fetched (pages placed by the uffd
    # path included), so the next restore on this node reads no chunk remotely
    cached = sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(empty) for f in fs)
    assert cached >= 0.95 * dumped["bytes_stored"], (cached, dumped["bytes_stored"])
    rc, listed, err = _done(_node(s3_server, store, str(empty), "ls"))
    assert rc == 0 and [s["id"] for s in listed] == [dumped["id"]], err


def test_two_nodes_dump_and_gc_at_once(workload, s3_server, s3_env, tmp_path):
    store = f"s3://{s3_env}/two"
    a = workload("--mib", "32", "--children", "1", name="a")
    b = workload("--mib", "24", "--seed", "9", name="b")
    caches = [str(tmp_path / "node-1"), str(tmp_path / "node-2")]
    # dead chunks that a's next dump will find and reuse: gc must not take them meanwhile
    rc, old, err = _done(_node(s3_server, store, caches[0], "dump", "--pid", str(a.pid),
                               "--leave-running"))
    assert rc == 0, err
    assert _done(_node(s3_server, store, caches[0], "rm", old["id"]))[0] == 0

    procs = [_node(s3_server, store, caches[0], "dump", "--pid", str(a.pid), "--leave-running",
                   "--name", "node-a"),
             _node(s3_server, store, caches[1], "dump", "--pid", str(b.pid), "--leave-running",
                   "--name", "node-b"),
             _node(s3_server, store, caches[1], "gc"),
             _node(s3_server, store, caches[0], "gc")]
    for rc, out, err in [_done(p) for p in procs]:
        assert rc == 0, err

    rc, report, err = _done(_node(s3_server, store, caches[1], "verify"))
    assert rc == 0 and report["bad"] == [] and report["snapshots"] == 2, report
    for w, name, cache in ((a, "node-a", caches[1]), (b, "node-b", caches[0])):    # the other node
        w.kill_all()
        wait_pids_free(w.pids)
        rc, out, err = _done(_node(s3_server, store, cache, "restore", name))
        assert rc == 0, err
        assert w.report()["data_ok"]


def test_warm_brings_a_snapshots_chunks_into_an_empty_cache(workload, s3_server, s3_env, tmp_path):
    """`gpusnap warm` on a node with an empty cache: every chunk comes down (the uffd
    path's fill then reads none from the bucket)."""
    store = f"s3://{s3_env}/warm"
    w = workload("--mib", "32", "--children", "1")
    rc, dumped, err = _done(_node(s3_server, store, str(tmp_path / "node-a"), "dump", "--pid",
                                  str(w.pid), "--name", "tree", "--leave-running"))
    assert rc == 0, err
    empty = tmp_path / "node-b"
    rc, warmed, err = _done(_node(s3_server, store, str(empty), "warm", "tree", "--pages", "uffd"))
    assert rc == 0 and warmed[0]["id"] == dumped["id"], err
    chunks = sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(empty)
                 for f in fs if "/packs/" in os.path.join(d, f) or "/chunks/" in os.path.join(d, f))
    assert chunks >= 0.95 * dumped["bytes_stored"], (chunks, dumped["bytes_stored"])
