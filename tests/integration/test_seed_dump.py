"""`gpusnap seed add` against real CRIU: a process holding a safetensors file's tensors
(tests/workloads/weightholder.py, each tensor from a page start) dumped into a store
seeded with that file writes little of them again, and restores byte-exact from chunks
the seed stored; off the page grid the seed holds nothing and the dump is as usual."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, wait_json, wait_pids_free

pytestmark = [pytest.mark.root]
PAGE = 4096


@pytest.fixture
def weights(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import seed_probe
    finally:
        sys.path.pop(0)
    path = str(tmp_path / "model.safetensors")
    seed_probe.make_safetensors(path, 48)
    return path


@pytest.fixture
def holder(tmp_path):
    procs = []

    def start(weights: str, phase: int = 0):
        state = tmp_path / f"h{len(procs)}"
        state.mkdir()
        log = open(state / "log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "tests.workloads.weightholder", weights,
                                 "--state", str(state), "--phase", str(phase)], cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        procs.append(proc)
        wait_json(str(state / "ready"), proc=proc)
        return proc, str(state)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check(pid: int, state: str) -> dict:
    os.kill(pid, signal.SIGUSR1)
    return wait_json(os.path.join(state, "report.json"), timeout=30)


def test_a_seeded_store_takes_the_weights_from_the_seed(gpusnap, holder, weights, tmp_path):
    proc, state = holder(weights)
    rc, seed, err = gpusnap("seed", "add", weights)
    assert rc == 0, err
    rc, snap, err = gpusnap("dump", "--pid", str(proc.pid))
    assert rc == 0, err
    proc.wait(30)                               # the dump ended it: reaped, its pid free
    wait_pids_free([proc.pid])
    # the image holds the tensors and the interpreter; the tensors came from the seed
    assert snap["bytes_new"] < snap["bytes_logical"] - 0.6 * seed["bytes_seeded"], (snap, seed)
    rc, seeds, _ = gpusnap("seed", "rm", seed["id"])
    assert rc == 0
    rc, gc, _ = gpusnap("gc")                    # the snapshot's chunks stay, the rest goes
    assert rc == 0 and gc["chunks"] > 0
    rc, out, err = gpusnap("restore", snap["id"])
    assert rc == 0, err
    try:
        report = _check(out["pid"], state)
        assert report["data_ok"] and report["pid"] == out["pid"]
    finally:
        os.kill(out["pid"], signal.SIGKILL)


def test_off_the_page_grid_the_seed_holds_nothing(gpusnap, holder, weights):
    proc, _state = holder(weights, phase=512)
    rc, seed, err = gpusnap("seed", "add", weights)
    assert rc == 0, err
    rc, snap, err = gpusnap("dump", "--pid", str(proc.pid), "--leave-running")
    assert rc == 0, err
    assert snap["bytes_new"] > seed["bytes_seeded"] * 0.9, (snap, seed)
