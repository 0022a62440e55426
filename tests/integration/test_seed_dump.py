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

from conftest import REPO, make_weights, wait_json, wait_pids_free

pytestmark = [pytest.mark.root]
PAGE = 4096


@pytest.fixture
def weights(tmp_path):
    return make_weights(str(tmp_path / "model.safetensors"), 48)


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


def _restores_intact(gpusnap, snap_id: str, state: str) -> None:
    rc, out, err = gpusnap("restore", snap_id)
    assert rc == 0, err
    try:
        report = _check(out["pid"], state)
        assert report["data_ok"] and report["pid"] == out["pid"]
    finally:
        os.kill(out["pid"], signal.SIGKILL)


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
    _restores_intact(gpusnap, snap["id"], state)


def test_off_the_page_grid_the_seed_holds_nothing(gpusnap, holder, weights):
    proc, _state = holder(weights, phase=512)
    rc, seed, err = gpusnap("seed", "add", weights)
    assert rc == 0, err
    rc, snap, err = gpusnap("dump", "--pid", str(proc.pid), "--leave-running")
    assert rc == 0, err
    assert snap["bytes_new"] > seed["bytes_seeded"] * 0.9, (snap, seed)


def test_dump_seed_stores_the_weights_while_it_dumps(gpusnap, store, holder, weights):
    """`dump --seed`: the seed is made beside the dump (recorded, kept from gc), the
    snapshot restores byte-exact, and the next dump with the same file uses that seed
    without reading it again."""
    hour_ago = os.stat(weights).st_mtime - 3600      # the model landed before: a seed that
    os.utime(weights, (hour_ago, hour_ago))         # is stamped in its second is not reused
    proc, state = holder(weights)
    rc, snap, err = gpusnap("dump", "--pid", str(proc.pid), "--leave-running", "--seed", weights)
    assert rc == 0, err
    seed = snap["seed"]
    assert seed["reused"] is False and seed["id"] and seed["bytes_seeded"] > 40 << 20, snap
    assert "seed_start" in snap["timings"] and "seed_wait" in snap["timings"]
    rc, listed, _ = gpusnap("seed", "ls")
    assert [s["id"] for s in listed["seeds"]] == [seed["id"]]
    chunks = os.path.join(store, "chunks")
    on_disk = sum(os.path.getsize(os.path.join(d, n)) for d, _s, names in os.walk(chunks)
                  for n in names)
    # each reported what it wrote; a chunk both stored in the same instant is counted twice
    assert on_disk <= seed["bytes_new"] + snap["bytes_new"], (on_disk, seed, snap)
    rc, again, err = gpusnap("dump", "--pid", str(proc.pid), "--leave-running", "--seed", weights)
    assert rc == 0, err
    assert again["seed"] == {"id": seed["id"], "reused": True, "bytes_seeded": seed["bytes_seeded"],
                             "bytes_new": 0, "seconds": 0.0, "sources": [os.path.abspath(weights)]}
    assert again["bytes_new"] < 4 << 20, again
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    wait_pids_free([proc.pid])
    _restores_intact(gpusnap, snap["id"], state)


def test_dump_seed_auto_seeds_the_file_the_target_names(gpusnap, store, holder, weights, tmp_path):
    """`dump --seed auto`: the weights file on the holder's command line is found and
    seeded as the dump runs (read through the descriptor discovery opened), recorded
    under the name the target gave it; the next dump finds that seed; the snapshot
    restores byte-exact. A target naming no weights file dumps without a seed."""
    hour_ago = os.stat(weights).st_mtime - 3600
    os.utime(weights, (hour_ago, hour_ago))
    proc, state = holder(weights)
    rc, snap, err = gpusnap("dump", "--pid", str(proc.pid), "--leave-running", "--seed", "auto")
    assert rc == 0, err
    seed = snap["seed"]
    assert seed["auto"] is True and seed["skipped"] == [] and seed["reused"] is False, snap
    assert seed["sources"] == [weights] and seed["bytes_seeded"] > 40 << 20, snap
    rc, listed, _ = gpusnap("seed", "ls")
    assert [s["id"] for s in listed["seeds"]] == [seed["id"]]
    rc, again, err = gpusnap("dump", "--pid", str(proc.pid), "--leave-running", "--seed", "auto")
    assert rc == 0, err
    assert again["seed"]["reused"] is True and again["seed"]["id"] == seed["id"], again
    assert again["bytes_new"] < 4 << 20, again
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    wait_pids_free([proc.pid])
    _restores_intact(gpusnap, snap["id"], state)
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc, out, err = gpusnap("dump", "--pid", str(bare.pid), "--leave-running", "--seed", "auto")
        assert rc == 0, err
        assert out["seed"] == {"id": None, "reused": False, "bytes_seeded": 0, "bytes_new": 0,
                               "seconds": 0.0, "sources": [], "auto": True, "skipped": []}, out
        assert "names no .safetensors file" in err
    finally:
        bare.kill()
        bare.wait()


def test_seed_add_pid_seeds_what_a_running_server_names(gpusnap, store, holder, weights):
    """`seed add --pid`: the weights the holder names, seeded ahead of its first dump,
    not again while unchanged; that dump then writes little; a process naming no
    weights file is an error (exit 2)."""
    hour_ago = os.stat(weights).st_mtime - 3600
    os.utime(weights, (hour_ago, hour_ago))
    proc, _state = holder(weights)
    rc, seed, err = gpusnap("seed", "add", "--pid", str(proc.pid), "--name", "holder")
    assert rc == 0, err
    assert seed["files"] == [weights] and seed["reused"] is False and seed["skipped"] == [], seed
    assert seed["bytes_new"] > 40 << 20, seed
    rc, again, err = gpusnap("seed", "add", "--pid", str(proc.pid))
    assert rc == 0, err
    assert again["reused"] is True and again["id"] == seed["id"] and again["bytes_new"] == 0, again
    rc, snap, err = gpusnap("dump", "--pid", str(proc.pid), "--leave-running")
    assert rc == 0, err
    assert snap["bytes_new"] < snap["bytes_logical"] - 0.6 * seed["bytes_seeded"], (snap, seed)
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc, out, _err = gpusnap("seed", "add", "--pid", str(bare.pid))
        assert rc == 2 and "names no .safetensors file" in out["message"], out
    finally:
        bare.kill()
        bare.wait()
    rc, out, _err = gpusnap("seed", "add")
    assert rc == 2 and "--pid" in out["message"], out


def test_dump_seed_refuses_a_file_that_is_no_safetensors_before_the_target_is_touched(
        gpusnap, store, holder, weights, tmp_path):
    proc, _state = holder(weights)
    bogus = tmp_path / "notes.safetensors"
    bogus.write_bytes(b"\xff" * 64)
    rc, out, err = gpusnap("dump", "--pid", str(proc.pid), "--seed", str(bogus))
    assert rc == 2 and "is not a safetensors file" in out["message"], (out, err)
    assert proc.poll() is None                  # untouched: still running
    seeds = os.path.join(store, "seeds")
    assert not os.path.isdir(seeds) or not os.listdir(seeds)
