"""The uffd page path for real: CRIU's lazy restore served by gpusnap, and kill -9 of gpusnap
at several points of it. A page never placed would read as zeros: after a kill, no task of
the restored tree may be left (the guard kills it), and the snapshot restores fine again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, wait_pids_free, wait_until

pytestmark = [pytest.mark.root]


def _restore_cli(store: str, snap: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpusnap", "--json", "restore", snap, "--pages", "uffd"],
                            cwd=REPO, env={**os.environ, "GPUSNAP_STORE": store, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _dump(workload, gpusnap, *args):
    w = workload("--mib", "64", "--zero-mib", "16", "--children", "2", "--threads", "2", *args)
    rc, snap, err = gpusnap("dump", "--pid", str(w.pid))
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)
    return w, snap


def _alive(pids) -> list[int]:
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, FileNotFoundError):   # psutil 7.2 lets the latter out
            pass                                            # for a pid exiting meanwhile
    return out


def test_uffd_restore_brings_back_every_workload_part(workload, gpusnap, tmp_path):
    mapped = tmp_path / "mapped"
    w, snap = _dump(workload, gpusnap, "--mmap-file", str(mapped))
    rc, res, err = gpusnap("restore", snap["id"], "--pages", "uffd")
    assert rc == 0, err
    assert res["page_path"] == "uffd"
    assert res["fill"]["bytes"] >= 64 << 20
    assert "uffd_fill" in res["timings"]
    report = w.report()
    assert report["data_ok"] and report["zeros_ok"] and report["children_ok"], report
    assert report["threads_moving"] and report["mmap_ok"] is not False
    w.kill_all()


def test_criu_pages_stay_selectable(workload, gpusnap):
    w, snap = _dump(workload, gpusnap)
    rc, res, err = gpusnap("restore", snap["id"], "--pages", "criu")
    assert rc == 0, err
    assert res["page_path"] == "criu" and res["fill"] is None
    assert w.report()["data_ok"]
    w.kill_all()


def test_kill_9_during_the_fill_leaves_no_restored_tree(workload, gpusnap, store):
    """A chunk of the pages becomes a FIFO: the worker that opens it waits there, the
    fill is under way, and gpusnap is killed. The guard must kill the tree."""
    w, snap = _dump(workload, gpusnap)
    # A chunk from the middle of the root's data (the biggest pages image): lazy, so the
    # fill reads it; and no restorer faults on it while CRIU runs.
    with _fifo_chunk(store, snap["id"], lambda stored: stored[len(stored) // 2]):
        proc = _restore_cli(store, snap["id"])
        assert wait_until(lambda: _alive([w.pid])), "CRIU never restored the tree"
        time.sleep(0.5)                       # the fill runs into the FIFO meanwhile
        _kill_and_see_the_tree_go(proc, w)
    _restores_again(w, gpusnap, snap)


@contextlib.contextmanager
def _fifo_chunk(store: str, snap_id: str, pick):
    """A stored chunk of the biggest pages image (pick(its chunk ids) says which) becomes
    a FIFO: the fill's worker that opens it waits there until the block ends."""
    from gpusnap.store import Repository
    repo = Repository.open(store, create=False)
    m = repo.load(snap_id)
    biggest = max((f for f in m.files if f.path.startswith("pages-")), key=lambda f: f.size)
    path = repo.chunk_path(pick([c for c, n in biggest.chunks if c != "zero"]))
    os.rename(path, path + ".real")
    os.mkfifo(path, 0o600)
    try:
        yield path
    finally:
        _unblock(path)
        os.unlink(path)
        os.rename(path + ".real", path)


def _kill_and_see_the_tree_go(proc, w) -> None:
    proc.kill()
    proc.wait()
    assert wait_until(lambda: not _alive(w.pids), timeout=10), f"left alive: {_alive(w.pids)}"


def _restores_again(w, gpusnap, snap, env=None) -> None:
    wait_pids_free(w.pids)
    rc, res, err = gpusnap("restore", snap["id"], "--pages", "uffd", env=env)
    assert rc == 0, err
    assert w.report()["data_ok"]
    w.kill_all()


def test_kill_9_after_the_fill_before_the_tree_runs(workload, gpusnap, store, tmp_path):
    """CRIU (a wrapper) returns 3 s late: the tree is restored and filled, still stopped,
    when gpusnap is killed. The restore was never reported: the tree must go."""
    from gpusnap.criu.locate import find_criu
    fake = tmp_path / "criu-slow"
    fake.write_text(f'#!/bin/sh\n"{find_criu()[0]}" "$@"\nrc=$?\n[ "$1" = restore ] && sleep 3\nexit $rc\n')
    fake.chmod(0o755)
    w, snap = _dump(workload, gpusnap)
    proc = _restore_cli(store, snap["id"], env={"GPUSNAP_CRIU": str(fake)})
    assert wait_until(lambda: len(_alive(w.pids)) == 3), "CRIU never restored the tree"
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    assert wait_until(lambda: not _alive(w.pids), timeout=10), f"left alive: {_alive(w.pids)}"
    wait_pids_free(w.pids)
    rc, res, err = gpusnap("restore", snap["id"])
    assert rc == 0, err
    assert res["page_path"] == "uffd"
    assert w.report()["data_ok"]
    w.kill_all()


def _unblock(fifo: str) -> None:
    """Let a worker orphaned in open() of the FIFO go (it then fails on an empty chunk)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


OVERLAP = {"GPUSNAP_UFFD_OVERLAP": "1", "GPUSNAP_TEST_LATE": "largest"}


def test_late_ranges_filled_while_the_tree_runs(workload, gpusnap):
    """GPUSNAP_UFFD_OVERLAP: the late ranges (a CUDA pid's staging memory; here each
    pid's largest run of pages, as the test hook makes them) are placed after the tree
    is continued, its threads running and faulting on them meanwhile: every page comes
    back, and the restore reports only once all are in."""
    w, snap = _dump(workload, gpusnap)
    rc, res, err = gpusnap("restore", snap["id"], "--pages", "uffd", env=OVERLAP)
    assert rc == 0, err
    assert res["fill"]["late_bytes"] >= 32 << 20, res["fill"]
    assert "uffd_fill_late" in res["timings"], res["timings"]
    report = w.report()
    assert report["data_ok"] and report["zeros_ok"] and report["children_ok"], report
    assert report["threads_moving"]
    w.kill_all()


def test_kill_9_during_the_late_fill_leaves_no_restored_tree(workload, gpusnap, store):
    """gpusnap killed while the late ranges are placed, the tree running: the guard
    kills the tree (its tasks wait on any page not placed, they never read zeros)."""
    w, snap = _dump(workload, gpusnap)
    with _fifo_chunk(store, snap["id"], lambda stored: stored[-2]):     # in the root's largest run
        proc = _restore_cli(store, snap["id"], env=OVERLAP)
        running = lambda: any(psutil.Process(p).status() != psutil.STATUS_STOPPED  # noqa: E731
                              for p in _alive(w.pids))
        assert wait_until(running), "the tree was never continued"
        time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()
        _kill_and_see_the_tree_go(proc, w)
    _restores_again(w, gpusnap, snap, env=OVERLAP)


def test_a_task_reading_its_memory_during_the_late_fill_reads_it_right(workload, gpusnap, store):
    """The root checks its data (a SHA-256 over all of it) as soon as it runs again,
    while the late ranges are still being placed (slowly: each late batch waits 150 ms
    first): the pages it reads ahead of the fill are placed by the guard for its faults;
    the checksum is the dump's."""
    w = workload("--mib", "256", "--children", "1")
    rc, snap, err = gpusnap("dump", "--pid", str(w.pid))
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)
    report = os.path.join(w.state, "report.json")
    proc = _restore_cli(store, snap["id"], env={**OVERLAP, "GPUSNAP_TEST_LATE_DELAY_MS": "150"})
    assert wait_until(lambda: _alive([w.pid]) and
                 psutil.Process(w.pid).status() != psutil.STATUS_STOPPED), "never continued"
    os.kill(w.pid, signal.SIGUSR1)              # reads everything: faults on the late pages
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    fill = json.loads(out)["fill"]
    assert fill["late_bytes"] >= 128 << 20, fill
    assert wait_until(lambda: os.path.exists(report))
    with open(report) as f:
        got = json.load(f)
    assert got["data_ok"], got
    w.kill_all()


STAGING_THP = {"GPUSNAP_STAGING_THP": "1", "GPUSNAP_TEST_LATE": "largest"}


def _huge_bytes(pid: int) -> int:
    """AnonHugePages of all of pid's mappings."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("AnonHugePages:"))


def test_staging_thp_writes_the_largest_runs_in_huge_pages(workload, gpusnap):
    """GPUSNAP_STAGING_THP: the staging ranges (here each pid's largest run of pages, as
    the test hook makes them) leave the userfaultfd and are written with
    process_vm_writev in gpusnap's huge-page window, before the tree runs: every page
    comes back, in 2 MiB pages where the host's THP mode allows them."""
    from gpusnap.cuda import hugepages
    w, snap = _dump(workload, gpusnap)
    _compact_memory()               # free 2 MiB blocks, after a whole suite's page cache
    fallbacks = _thp_fallbacks()
    rc, res, err = gpusnap("restore", snap["id"], "--pages", "uffd", env=STAGING_THP)
    assert rc == 0, err
    assert res["fill"]["direct_bytes"] >= 32 << 20, res["fill"]
    report = w.report()
    assert report["data_ok"] and report["zeros_ok"] and report["children_ok"], report
    if hugepages.read_mode() in ("madvise", "always") and os.geteuid() == 0:
        assert res["fill"]["huge_pages"] or hugepages.read_mode() == "always", res["fill"]
        # huge pages, or the kernel was asked for them and had none free (its counter)
        assert _huge_bytes(w.pid) >= 16 << 20 or _thp_fallbacks() > fallbacks
    w.kill_all()


def _compact_memory() -> None:
    try:
        with open("/proc/sys/vm/compact_memory", "w") as f:
            f.write("1")
    except OSError:
        pass


def _thp_fallbacks() -> int:
    """The kernel's count of anonymous faults that wanted a huge page and got none."""
    with open("/proc/vmstat") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("thp_fault_fallback "))


def test_kill_9_during_the_staging_thp_fill_leaves_no_restored_tree(workload, gpusnap, store):
    """gpusnap killed while it writes the ranges it took out of the userfaultfd (pages
    there would read as zeros): the tree never runs, the guard kills it."""
    w, snap = _dump(workload, gpusnap)
    with _fifo_chunk(store, snap["id"], lambda stored: stored[-2]):     # in the root's largest run
        proc = _restore_cli(store, snap["id"], env=STAGING_THP)
        time.sleep(1.5)
        assert proc.poll() is None, proc.communicate()
        assert all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in _alive(w.pids))
        _kill_and_see_the_tree_go(proc, w)
    _restores_again(w, gpusnap, snap, env=STAGING_THP)
