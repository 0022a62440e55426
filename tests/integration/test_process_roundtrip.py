"""Real CRIU on real process trees: dump -> restore keeps every kind of state intact."""

from __future__ import annotations

import os

import psutil
import pytest

from gpusnap.store import Repository

from conftest import wait_pids_free

pytestmark = [pytest.mark.root]


def _assert_healthy(report: dict, *, children: int, threads: int) -> None:
    assert report["data_ok"], report
    assert report["zeros_ok"], report
    assert report["children_ok"] and len(report["children"]) == children, report
    assert report["threads_alive"] == threads and report["threads_moving"], report
    assert report["mmap_ok"] in (True, None), report


def test_multiprocess_tree_with_256_mib_survives_dump_and_restore(workload, gpusnap, tmp_path):
    w = workload("--mib", "256", "--children", "2", "--threads", "3",
                 "--mmap-file", str(tmp_path / "mapped"))
    before = w.report()
    _assert_healthy(before, children=2, threads=3)

    rc, out, err = gpusnap("dump", "--pid", str(w.pid), "--name", "tree")
    assert rc == 0, err
    assert out["bytes_logical"] >= 256 << 20
    # held from CRIU's freeze to the commit's end: at least CRIU, ingest and commit
    t = out["timings"]
    assert out["downtime"] >= t["criu_dump"] + t["ingest"] + t["commit"] - 0.01
    w.reap()
    wait_pids_free(w.pids)
    assert not any(psutil.pid_exists(p) for p in w.pids), "dump without --leave-running stops the original"

    rc, out, err = gpusnap("restore", "tree")
    assert rc == 0, err
    assert out["pid"] == w.pid
    after = w.report()
    _assert_healthy(after, children=2, threads=3)
    assert after["ticks"] >= before["ticks"], "in-memory counter carried over"
    assert after["mmap_ok"] is True


def test_leave_running_keeps_original_and_restore_is_refused_while_it_runs(workload, gpusnap):
    w = workload("--mib", "32", "--children", "1")
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), "--leave-running")
    assert rc == 0, err
    _assert_healthy(w.report(), children=1, threads=0)
    # held only while CRIU ran (it resumes the tree itself): not during ingest and commit
    assert out["timings"]["criu_dump"] - 0.01 <= out["downtime"] <= out["timings"]["criu_dump"] + 0.5

    rc, out, err = gpusnap("restore", out["id"])
    assert rc == 6, err
    assert out["error"] == "PidInUse"
    _assert_healthy(w.report(), children=1, threads=0)


def test_second_snapshot_of_barely_changed_process_adds_few_bytes(workload, gpusnap):
    w = workload("--mib", "256", "--children", "1", "--threads", "1")
    rc, first, err = gpusnap("dump", "--pid", str(w.pid), "--leave-running")
    assert rc == 0, err
    rc, second, err = gpusnap("dump", "--pid", str(w.pid), "--leave-running")
    assert rc == 0, err
    assert second["bytes_new"] <= 0.10 * second["bytes_logical"], second
    rc, info, err = gpusnap("inspect", second["id"])
    for key in ("id", "name", "created", "target", "pids", "criu_version", "kernel",
                "bytes_logical", "bytes_stored", "bytes_new", "timings"):
        assert key in info, key
    assert set(info["pids"]) == set(w.pids)


def test_flipped_byte_is_caught_by_verify_and_refused_by_restore(workload, gpusnap, store):
    w = workload("--mib", "16")
    rc, out, err = gpusnap("dump", "--pid", str(w.pid))
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)
    assert gpusnap("verify")[0] == 0

    chunks_dir = os.path.join(store, "chunks")
    biggest = max((os.path.join(d, f) for d, _, fs in os.walk(chunks_dir) for f in fs),
                  key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.seek(os.path.getsize(biggest) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))

    rc, report, err = gpusnap("verify")
    assert rc == 42, err
    rc, res, err = gpusnap("restore", out["id"])
    assert rc == 42, err
    assert not psutil.pid_exists(w.pid), "nothing restored from corrupt data"
    rc, info, _ = gpusnap("inspect", out["id"])
    assert rc == 0, "the snapshot itself stays"


# CRIU killed mid-dump, and the other dump faults: test_faults.py.


def test_dump_errors_have_distinct_exit_codes(gpusnap, store):
    rc, out, _ = gpusnap("dump", "--pid", "999999")
    assert rc == 5 and out["error"] == "TargetNotFound"
    rc, out, _ = gpusnap("restore", "nosuch")
    assert rc == 40 and out["error"] == "StoreError", "no store yet: restore creates none"
    Repository.open(store)
    rc, out, _ = gpusnap("restore", "nosuch")
    assert rc == 3 and out["error"] == "SnapshotNotFound"


def test_restore_from_a_warm_cache_skips_materialise(workload, gpusnap, store):
    w = workload("--mib", "64", "--children", "1")
    rc, snap, err = gpusnap("dump", "--pid", str(w.pid), "--name", "warmme")
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)
    rc, warmed, err = gpusnap("warm", "warmme", "--pages", "criu")
    assert rc == 0, err
    cache = os.path.dirname(warmed[0]["path"])
    assert os.stat(cache).st_mode & 0o077 == 0 or os.stat(os.path.dirname(cache)).st_mode & 0o077 == 0
    for _ in range(2):                               # one cache serves many restores
        rc, res, err = gpusnap("restore", "warmme", "--pages", "criu")    # the warm cache is the criu path's
        assert rc == 0, err
        assert "materialise" not in res["timings"]
        assert any("warm cache" in n for n in res["notes"])
        assert w.report()["data_ok"]
        for pid in w.pids:
            os.kill(pid, 9)
        wait_pids_free(w.pids)
    rc, out, err = gpusnap("rm", "warmme")
    assert rc == 0, err
    assert not os.path.exists(cache), "rm drops the snapshot's cache"
