"""Several CUDA processes in one tree: the CUDA stages take them at once, and a child
that starts using the GPU while gpusnap dumps is handled (engine/cudarace.py).

Run on the GPU machine (pytest -m gpu tests/gpu). With GPUSNAP_RESULTS set, the CUDA
stage timings parallel vs serial (GPUSNAP_CUDA_PARALLEL) and the race test's outcome,
time and downtime are written there as JSON.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import wait_pids_free
from tests.workloads.cuda_forker import Forker

pytestmark = [pytest.mark.gpu, pytest.mark.root]

CUDA_STAGES = ("cuda_lock", "cuda_checkpoint", "cuda_restore", "cuda_unlock")


def _states(pids) -> dict[int, str]:
    """Driver state of each pid still there (gone ones left out)."""
    from gpusnap.cuda import get_driver
    from gpusnap.errors import GpusnapError
    out = {}
    for pid in pids:
        try:
            out[pid] = get_driver().get_state(pid).name
        except GpusnapError:
            continue
    return out


def _record(name: str, data: dict) -> None:
    out = os.environ.get("GPUSNAP_RESULTS")
    if out:
        with open(os.path.join(out, name), "w") as f:
            json.dump(data, f, indent=1)


@pytest.fixture
def forker(tmp_path):
    started = []

    def start(*args: str) -> Forker:
        d = tmp_path / f"forker{len(started)}"
        d.mkdir()
        f = Forker(str(d), *args)
        started.append(f)
        return f.start()

    yield start
    for f in started:
        f.stop()


def test_four_cuda_children_are_checkpointed_at_once_and_restored(forker, gpusnap):
    f = forker("--children", "4", "--mib", "1024")
    kids = f.children
    runs = {}
    for mode in ("0", "1"):         # serial first, then parallel: the same tree
        rc, snap, err = gpusnap("dump", "--pid", str(f.pid), "--leave-running",
                                env={"GPUSNAP_CUDA_PARALLEL": mode})
        assert rc == 0, err
        runs["parallel" if mode == "1" else "serial"] = {
            **{k: snap["timings"].get(k) for k in CUDA_STAGES}, "downtime": snap["downtime"]}
        assert _states(kids) == {pid: "RUNNING" for pid in kids}
        assert all(f.check(pid)["intact"] for pid in kids)
        rc, info, err = gpusnap("inspect", snap["id"])
        assert sorted(info["cuda"]["pids"]) == sorted(kids)
    _record("cuda_parallel_4x1gib.json", runs)

    rc, snap, err = gpusnap("dump", "--pid", str(f.pid))          # parallel, original goes
    assert rc == 0, err
    pids = f.tree() or [f.pid, *kids]
    f.stop()
    wait_pids_free(pids)
    rc, res, err = gpusnap("restore", snap["id"])
    assert rc == 0, err
    f.pid = res["pid"]
    assert _states(kids) == {pid: "RUNNING" for pid in kids}
    assert all(f.check(pid)["intact"] for pid in kids)


def test_a_child_starting_cuda_mid_dump_is_handled_or_refused_in_bounded_time(forker, gpusnap):
    """The parent forks a CUDA child every 0.3 s (up to 16) while gpusnap dumps it: the
    dump either succeeds (every CUDA process locked and checkpointed, or CRIU would
    have failed on its device mappings) or ends with GpuRace (26), leading with the
    cause; either way the original runs, none of it left locked or checkpointed."""
    f = forker("--children", "2", "--every", "0.3", "--max", "16", "--mib", "64")
    start = time.monotonic()
    rc, out, err = gpusnap("dump", "--pid", str(f.pid), "--leave-running")
    took = time.monotonic() - start
    _record("cuda_child_mid_dump.json", {"rc": rc, "seconds": took, "out": out,
                                         "stderr": err[-2000:]})
    assert rc in (0, 26), err
    if rc == 26:
        assert out["error"] == "GpuRace"
        assert out["message"].startswith("a process of the tree started using the GPU during "
                                         "the dump: pid"), out
    else:
        assert out["downtime"] > 0
    assert took < 120, f"took {took:.0f} s"
    tree = f.tree()
    assert tree and tree[0] == f.pid, "the parent runs"
    states = _states(tree)
    assert states and set(states.values()) == {"RUNNING"}, states
    assert all(f.check(pid)["intact"] for pid in states)
