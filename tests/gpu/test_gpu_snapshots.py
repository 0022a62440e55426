"""gpusnap dump/restore of real CUDA processes: CRIU + the CUDA checkpoint API, end to end.

Run on the GPU machine (pytest -m gpu). With GPUSNAP_RESULTS set, the per-stage timings
of the 2 GiB round trip are written there as JSON (benchmarks/results/ keeps them).
"""

from __future__ import annotations

import json
import os

import pytest


pytestmark = [pytest.mark.gpu, pytest.mark.root]


def wait_pids_free(pids, timeout: float = 30) -> None:
    import time
    import psutil
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.02)


def _state(pid: int) -> str:
    from gpusnap.cuda import get_driver
    return get_driver().get_state(pid).name


def _roundtrip(holder, gpusnap, *extra_restore, env=None):
    before = holder.check()
    assert before["intact"]
    rc, snap, err = gpusnap("dump", "--pid", str(holder.pid))
    assert rc == 0, err
    assert snap["bytes_logical"] >= holder.gib * (1 << 30)
    pid = holder.pid
    holder.stop()                       # reap: gpusnap killed it after the commit
    wait_pids_free([pid])
    rc, res, err = gpusnap("restore", snap["id"], *extra_restore, env=env)
    assert rc == 0, err
    assert res["pid"] == pid
    holder.pid = pid
    after = holder.check()
    assert after["intact"], after
    assert after["checksum"] == before["checksum"]
    return snap, res


def test_2gib_of_gpu_data_survives_dump_and_restore(start_holder, gpusnap):
    holder = start_holder(gib=2.0, mode="idle")
    snap, res = _roundtrip(holder, gpusnap)
    stages = {**snap["timings"], **res["timings"]}
    for stage in ("cuda_lock", "cuda_checkpoint", "criu_dump", "ingest", "materialise",
                  "criu_restore", "cuda_restore", "cuda_unlock"):
        assert stage in stages, stage
    out = os.environ.get("GPUSNAP_RESULTS")
    if out:
        from gpusnap.cuda import host_gpus
        with open(os.path.join(out, "gpu_stages.json"), "w") as f:
            json.dump({"card": host_gpus().gpus[0].name, "gib": 2.0, "bytes_logical": snap["bytes_logical"],
                       "bytes_new": snap["bytes_new"], "stages": stages}, f, indent=1)
    holder.stop()


def test_staging_memory_filled_during_the_cuda_restore(start_holder, gpusnap):
    """GPUSNAP_UFFD_OVERLAP=1: the dump recorded where the driver put the device memory;
    the restore places it while the driver's restore reads it, and the data, graphs and
    cuBLAS come back as without it."""
    holder = start_holder(gib=2.0, mode="graphs")
    snap, res = _roundtrip(holder, gpusnap, "--pages", "uffd", env={"GPUSNAP_UFFD_OVERLAP": "1"})
    assert res["fill"].get("late_bytes", 0) >= 1 << 30, (res["fill"], res["notes"])
    assert "uffd_fill_late" in res["timings"], res["timings"]
    assert holder.check()["graphs_ok"]
    holder.stop()


def test_cuda_graphs_and_cublas_on_two_streams_survive(start_holder, gpusnap):
    holder = start_holder(gib=1.0, mode="graphs")
    _, _ = _roundtrip(holder, gpusnap)
    assert holder.check()["graphs_ok"]
    holder.stop()


def test_leave_running_keeps_original_and_copy_right(start_holder, gpusnap):
    holder = start_holder(gib=1.0, mode="graphs")
    before = holder.check()
    rc, snap, err = gpusnap("dump", "--pid", str(holder.pid), "--leave-running")
    assert rc == 0, err
    assert _state(holder.pid) == "RUNNING"
    assert holder.check()["intact"]
    pid = holder.pid
    holder.stop()
    wait_pids_free([pid])
    rc, res, err = gpusnap("restore", snap["id"])
    assert rc == 0, err
    holder.pid = res["pid"]
    after = holder.check()
    assert after["intact"] and after["checksum"] == before["checksum"]
    holder.stop()


def test_criu_failing_mid_dump_leaves_process_running_and_unlocked(start_holder, gpusnap, tmp_path):
    from gpusnap.criu.locate import find_criu
    fake = tmp_path / "criu-dies"
    fake.write_text(f"""#!/bin/sh
case "$1" in
  dump) "{find_criu()[0]}" "$@" & pid=$!; sleep 0.2; kill -9 $pid; exit 137;;
  *) exec "{find_criu()[0]}" "$@";;
esac
""")
    fake.chmod(0o755)
    holder = start_holder(gib=1.0, mode="graphs")
    rc, out, err = gpusnap("dump", "--pid", str(holder.pid), env={"GPUSNAP_CRIU": str(fake)})
    assert rc == 11, err
    assert _state(holder.pid) == "RUNNING"
    result = holder.check()
    assert result["intact"] and result["graphs_ok"]
    assert gpusnap("ls")[1] == []
    holder.stop()


def test_restore_onto_the_other_gpu_and_back(start_holder, gpusnap):
    from gpusnap.cuda import host_gpus
    gpus = host_gpus().gpus
    if len(gpus) < 2:
        pytest.skip("needs two GPUs")
    holder = start_holder(gib=1.0, mode="idle")
    snap, res = _roundtrip(holder, gpusnap, "--gpu", "1")
    rc, snap2, err = gpusnap("dump", "--pid", str(holder.pid))
    assert rc == 0, err
    assert snap2["id"]
    rc, info, _ = gpusnap("inspect", snap2["id"])
    assert list(info["cuda"]["used_memory"]) == [gpus[1].uuid], "the copy ran on GPU 1"
    pid = holder.pid
    holder.stop()
    wait_pids_free([pid])
    rc, res, err = gpusnap("restore", snap2["id"], "--gpu", "0")
    assert rc == 0, err
    holder.pid = res["pid"]
    assert holder.check()["intact"]
    holder.stop()
