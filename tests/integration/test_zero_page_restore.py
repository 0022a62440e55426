"""Zero-page elision against real CRIU: what it drops restores as zeros, what it keeps must be kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import REPO, wait_json, wait_pids_free
from gpusnap.criu import runner
from gpusnap.criu.argv import CriuOptions
from gpusnap.imagefile import mm, pagemap, zero_pages

pytestmark = [pytest.mark.root]
OK_KEYS = ("anon_ok", "private_ok", "shared_ok", "cow_parent_ok", "cow_child_ok")


@pytest.fixture
def zeroholder(tmp_path):
    procs = []

    def start():
        state = tmp_path / f"z{len(procs)}"
        state.mkdir()
        log = open(state / "log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "tests.workloads.zeroholder", "--state", str(state),
                                 "--file", str(state / "backing")], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, cwd=REPO)
        ready = wait_json(str(state / "ready"), proc=proc)
        procs.append((proc, [ready["pid"], *ready["children"]]))
        return proc, ready["pid"], ready["children"], str(state)

    yield start
    for proc, pids in procs:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        wait_pids_free(pids)


def report(state: str, pid: int) -> dict:
    path = os.path.join(state, "report.json")
    if os.path.exists(path):
        os.unlink(path)
    os.kill(pid, signal.SIGUSR1)
    return wait_json(path, timeout=30)


def test_every_kind_of_mapping_reads_the_same_after_elided_dump_and_restore(zeroholder, gpusnap):
    proc, pid, children, state = zeroholder()
    assert all(report(state, pid)[k] for k in OK_KEYS)
    rc, out, err = gpusnap("dump", "--pid", str(pid), "--name", "z")
    assert rc == 0, err
    proc.wait(timeout=30)
    wait_pids_free([pid, *children])
    rc, info, err = gpusnap("inspect", "z")
    # anon: 260 zero pages; the child's copy-on-write area: 260 more (shared and file pages stay)
    assert info["zero_pages_dropped"] >= 2 * len(set(__import__("tests.workloads.zeroholder",
                                                                  fromlist=["ZERO_PAGES"]).ZERO_PAGES))
    rc, out, err = gpusnap("restore", "z")
    assert rc == 0, err
    after = report(state, pid)
    assert {k: after[k] for k in OK_KEYS} == {k: True for k in OK_KEYS}, after


def test_dropping_zero_pages_of_a_private_file_mapping_would_read_the_file(zeroholder, tmp_path):
    """Why elision looks at mm-*.img: the same rewrite applied to every VMA corrupts memory."""
    proc, pid, children, state = zeroholder()
    images = str(tmp_path / "images")
    os.makedirs(images)
    runner.dump(pid, images, CriuOptions(verbosity=1), leave="killed")
    proc.wait(timeout=30)
    wait_pids_free([pid, *children])
    for name in os.listdir(images):
        if name.startswith("pagemap-") and not name.startswith("pagemap-shmem"):
            pm = os.path.join(images, name)
            with open(os.path.join(images, "mm-" + name[len("pagemap-"):]), "rb") as f:
                everything = sorted((v.start, v.end) for v in mm.parse(f))
            with open(pm, "rb") as f:
                raw = pagemap.read_raw(f)
            pages_path = os.path.join(images, f"pages-{raw.pages_id}.img")
            with open(pages_path, "r+b", buffering=0) as pages:
                payloads, size, _ = zero_pages.elide_pair(raw, everything, pages, os.path.getsize(pages_path))
                pages.truncate(size)
            with open(pm, "wb") as f:
                pagemap.write(f, raw, payloads)
    runner.restore(images, CriuOptions(verbosity=1))
    after = report(state, pid)
    assert after["anon_ok"] and after["cow_child_ok"]
    assert after["private_ok"] is False, "a dropped page of a MAP_PRIVATE file mapping reads the file"


def test_touched_zero_memory_costs_nothing_in_the_store(workload, gpusnap):
    w = workload("--mib", "16", "--zero-mib", "256")
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), "--name", "zeros")
    assert rc == 0, err
    assert out["bytes_logical"] < 100 << 20, "256 MiB of zero pages are not in the images"
    w.reap()
    wait_pids_free(w.pids)
    rc, out, err = gpusnap("restore", "zeros")
    assert rc == 0, err
    after = w.report()
    assert after["data_ok"] and after["zeros_ok"], after
    assert psutil.pid_exists(w.pid)
