"""Park/resume and NCCL refusals with real CRIU and real processes, no GPU: what is
refused is refused before anything is touched, and `gpusnap ps` knows restored trees."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import libz_path, path_without_network_lock_tools, wait_pids_free

pytestmark = [pytest.mark.root]

RANK = ("import ctypes, signal, sys, time; ctypes.CDLL(sys.argv[1]); "
        "open(sys.argv[2], 'w').write('up'); time.sleep(600)")


@pytest.fixture
def fake_rank(tmp_path):
    """A process the way CRIU likes it (own session, stdio on a file) that maps a library
    named libnccl.so.2 and was started as one rank of two (WORLD_SIZE=2)."""
    lib = tmp_path / "libnccl.so.2"
    shutil.copy(libz_path(), lib)
    ready = tmp_path / "ready"
    with open(tmp_path / "rank.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", RANK, str(lib), str(ready)],
                                env={"PATH": os.environ.get("PATH", ""), "WORLD_SIZE": "2",
                                     "RANK": "0"},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    while not ready.exists():
        assert proc.poll() is None, (tmp_path / "rank.log").read_text()
        time.sleep(0.05)
    yield proc
    proc.kill()
    proc.wait()


def test_nccl_rank_is_refused_before_anything_is_touched(fake_rank, gpusnap):
    pid = str(fake_rank.pid)
    for args in (("dump", "--pid", pid), ("dump", "--pid", pid, "--leave-running"),
                 ("suspend", pid)):
        rc, out, err = gpusnap(*args)
        assert rc == 23, err
        assert out["error"] == "NcclPeerMemory"
        assert "NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0" in out["hint"]
        status = psutil.Process(fake_rank.pid).status()
        assert status in (psutil.STATUS_SLEEPING, psutil.STATUS_RUNNING), status
    assert gpusnap("ls")[1] == []
    assert gpusnap("ps")[1] == []
    # --force: the check is skipped (this rank has no CUDA: CRIU dumps it like any process)
    rc, out, err = gpusnap("dump", "--pid", pid, "--leave-running", "--force")
    assert rc == 0, err
    rc, out, err = gpusnap("suspend", pid, "--force")
    assert rc == 24 and out["error"] == "NoCudaProcess", err


def test_standby_of_a_snapshot_without_cuda_is_refused_and_restored_trees_are_listed(
        workload, gpusnap):
    w = workload("--mib", "16", "--children", "1")
    rc, snap, err = gpusnap("dump", "--pid", str(w.pid), "--name", "plain")
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)

    rc, out, err = gpusnap("restore", "plain", "--standby")
    assert rc == 2, err
    assert "no CUDA state" in out["message"]
    assert not any(psutil.pid_exists(p) for p in w.pids), "nothing restored"
    assert gpusnap("ps")[1] == []

    rc, out, err = gpusnap("restore", "plain")
    assert rc == 0, err
    assert w.report()["data_ok"]
    rows = gpusnap("ps")[1]
    assert [(r["pid"], r["state"], r["snapshot"]) for r in rows] == [(w.pid, "restored", snap["id"])]
    assert rows[0]["host_memory"] >= 16 << 20
    rc, out, err = gpusnap("resume", str(w.pid))
    assert rc == 25, "a restored tree runs: nothing to resume"
    for pid in w.pids:
        os.kill(pid, signal.SIGKILL)
    wait_pids_free(w.pids)
    assert gpusnap("ps")[1] == []


def test_two_rank_gloo_job_survives_dump_and_restore(tmp_path, gpusnap):
    """The TP=2 workload of the GPU tests over gloo on the CPU: two ranks talking over
    loopback TCP, dumped and restored as one tree, all-reduce still right; then the
    restored tree dumped and restored again (the GPU test's second round, there onto
    the GPUs swapped)."""
    pytest.importorskip("torch.distributed")
    from tests.workloads.tp_allreduce import TensorParallel
    tp = TensorParallel(str(tmp_path), mib=16, cpu=True)
    try:
        tp.start(timeout=120)
        before = [r["checksum"] for r in tp.check()]
        for _ in range(2):
            rc, snap, err = gpusnap("dump", "--pid", str(tp.pid))
            assert rc == 0, f"{err}\n{tp.logs()}"
            tp.reap()
            wait_pids_free([tp.pid, *tp.ranks])
            rc, out, err = gpusnap("restore", snap["id"])
            assert rc == 0, f"{err}\n{out}\n{tp.logs()}"
            after = tp.check()
            assert all(r["intact"] and r["allreduce_ok"] and not r["failures"] for r in after), \
                f"{after}\n{tp.logs()}"
            assert [r["checksum"] for r in after] == before
    finally:
        tp.stop()


def test_two_rank_job_without_iptables_skips_the_network_lock(tmp_path, gpusnap):
    """A host with neither iptables nor nftables (the GPU machines): CRIU cannot lock the
    two ranks' loopback TCP connections, which are all between processes of the tree, so
    gpusnap tells it to skip the lock (both ends are frozen) on dump and restore."""
    pytest.importorskip("torch.distributed")
    from tests.workloads.tp_allreduce import TensorParallel
    path = path_without_network_lock_tools()
    if path is None:
        pytest.skip("CRIU sits beside iptables here")
    env = {"PATH": path}
    tp = TensorParallel(str(tmp_path), mib=16, cpu=True)
    try:
        tp.start(timeout=120)
        before = [r["checksum"] for r in tp.check()]
        rc, snap, err = gpusnap("dump", "--pid", str(tp.pid), env=env)
        assert rc == 0, f"{err}\n{tp.logs()}"
        tp.reap()
        wait_pids_free([tp.pid, *tp.ranks])
        rc, out, err = gpusnap("restore", snap["id"], env=env)
        assert rc == 0, f"{err}\n{out}\n{tp.logs()}"
        after = tp.check(timeout=60)
        assert all(r["allreduce_ok"] and not r["failures"] for r in after), f"{after}\n{tp.logs()}"
        assert [r["checksum"] for r in after] == before
    finally:
        tp.stop()


def test_a_tree_talking_to_the_outside_without_iptables_is_refused_untouched(sleeper, gpusnap):
    import socket
    path = path_without_network_lock_tools()
    if path is None:
        pytest.skip("CRIU sits beside iptables here")
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    proc = sleeper(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))")
    peer, _ = srv.accept()
    try:
        rc, out, err = gpusnap("dump", "--force", "--pid", str(proc.pid), env={"PATH": path})
        assert rc == 11 and "refused before anything was touched" in err, err
        assert proc.poll() is None and psutil.Process(proc.pid).status() != "stopped"
    finally:
        peer.close()
        srv.close()
