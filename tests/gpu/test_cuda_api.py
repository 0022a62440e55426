"""The CUDA checkpoint API and CudaSession against a real process on a real GPU."""

from __future__ import annotations

import os
import time

import pytest

from gpusnap.cuda import CudaCallFailed, CudaSession, CudaState, cuda_pids, host_gpus

pytestmark = pytest.mark.gpu


def assert_intact(holder, before: dict | None = None) -> dict:
    result = holder.check()
    assert result["intact"], holder.log_tail()
    assert result["checksum"] == holder.checksum
    assert result["graphs_ok"], result
    if before is not None:
        assert result["iterations"] > before["iterations"], "the workload did not resume"
    return result


def test_lock_checkpoint_restore_unlock(holder, driver):
    pid = holder.pid
    before = assert_intact(holder)
    seen = {p.pid for p in host_gpus().processes}
    assert driver.get_state(pid) is CudaState.RUNNING
    assert holder.nvidia_fds()

    driver.lock(pid, 10_000)
    assert driver.get_state(pid) is CudaState.LOCKED
    driver.checkpoint(pid)
    assert driver.get_state(pid) is CudaState.CHECKPOINTED
    assert holder.nvidia_fds() == [], "a checkpointed process must hold no /dev/nvidia*"
    if pid in seen:
        assert pid not in {p.pid for p in host_gpus().processes}
    assert holder.rss() > 1 << 30, "device memory should now live in host memory"

    driver.restore(pid)
    assert driver.get_state(pid) is CudaState.LOCKED
    driver.unlock(pid)
    assert driver.get_state(pid) is CudaState.RUNNING
    assert holder.nvidia_fds()
    assert_intact(holder, before)


def test_restore_with_identity_pairs(holder, driver):
    """Proves the CUcheckpointRestoreArgs/GpuPair layout: the driver reads the pairs."""
    pairs = [(g.uuid, g.uuid) for g in host_gpus().gpus]
    before = assert_intact(holder)
    with CudaSession([holder.pid], driver) as session:
        session.lock_all(10_000)
        session.checkpoint_all()
        session.restore_all(pairs)
        session.unlock_all()
    assert session.state[holder.pid] is CudaState.RUNNING
    assert set(session.timings) == {"lock", "checkpoint", "restore", "unlock"}
    assert_intact(holder, before)


def test_rollback_from_locked(holder, driver):
    session = CudaSession([holder.pid], driver)
    session.lock_all(10_000)
    assert driver.get_state(holder.pid) is CudaState.LOCKED
    assert session.rollback() == []
    assert driver.get_state(holder.pid) is CudaState.RUNNING
    assert_intact(holder)


def test_rollback_from_checkpointed(holder, driver):
    session = CudaSession([holder.pid], driver)
    session.lock_all(10_000)
    session.checkpoint_all()
    assert session.rollback() == []
    assert driver.get_state(holder.pid) is CudaState.RUNNING
    assert_intact(holder)


def test_context_manager_rolls_back_on_error(holder, driver):
    with pytest.raises(RuntimeError, match="boom"):
        with CudaSession([holder.pid], driver) as session:
            session.lock_all(10_000)
            session.checkpoint_all()
            raise RuntimeError("boom")
    assert driver.get_state(holder.pid) is CudaState.RUNNING
    assert_intact(holder)


def test_started_locked_stays_locked(holder, driver):
    driver.lock(holder.pid, 10_000)
    try:
        session = CudaSession([holder.pid], driver)
        assert session.initial[holder.pid] is CudaState.LOCKED
        session.lock_all(10_000)        # nothing to do
        session.checkpoint_all()
        assert session.rollback() == []
        assert driver.get_state(holder.pid) is CudaState.LOCKED
    finally:
        driver.unlock(holder.pid)
    assert_intact(holder)


def test_unlock_while_checkpointed_is_refused(holder, driver):
    driver.lock(holder.pid, 10_000)
    driver.checkpoint(holder.pid)
    try:
        with pytest.raises(CudaCallFailed) as info:
            driver.unlock(holder.pid)
        assert info.value.name == "CUDA_ERROR_ILLEGAL_STATE"
        assert driver.get_state(holder.pid) is CudaState.CHECKPOINTED
    finally:
        driver.restore(holder.pid)
        driver.unlock(holder.pid)
    assert_intact(holder)


def test_restore_thread_and_discovery(holder, driver):
    tid = driver.restore_thread_id(holder.pid)
    assert os.path.isdir(f"/proc/{holder.pid}/task/{tid}")
    driver.init()
    assert cuda_pids([1, os.getpid(), holder.pid], driver) == [holder.pid]
    host = host_gpus()
    assert int(host.driver_version.split(".")[0]) >= 580
    assert all(g.uuid.startswith("GPU-") for g in host.gpus)
    used = host.used_memory([holder.pid])
    if used:        # NVML may not see processes inside some VMs and containers
        assert sum(used.values()) >= 1 << 30


def test_lock_timeout_leaves_process_running(start_holder, driver):
    """busy keeps a synchronize in flight ~all the time; a lock landing in the gap
    between two is retried."""
    busy = start_holder(gib=0.25, mode="busy")
    session = CudaSession([busy.pid], driver)
    for _ in range(3):
        start = time.monotonic()
        try:
            session.lock_all(timeout_ms=100)
        except CudaCallFailed as e:
            waited = time.monotonic() - start
            print(f"lock timeout after {waited:.3f}s: {e.message}")
            assert e.name in ("CUDA_ERROR_NOT_READY", "CUDA_ERROR_TIMEOUT")  # r580: NOT_READY
            assert 0.09 < waited < 5
            break
        session.rollback()
    else:
        pytest.fail("cuCheckpointProcessLock never timed out on a process in synchronize")
    assert session.state[busy.pid] is CudaState.RUNNING
    assert driver.get_state(busy.pid) is CudaState.RUNNING
    assert session.rollback() == []
    assert busy.check()["intact"]


def test_bad_remap_leaves_process_restorable(start_holder, driver):
    h = start_holder(gib=0.25)
    gpu = host_gpus().gpus[0].uuid
    bogus = "GPU-00000000-0000-0000-0000-000000000000"
    session = CudaSession([h.pid], driver)
    session.lock_all(10_000)
    session.checkpoint_all()
    with pytest.raises(CudaCallFailed) as info:
        session.restore_all([(gpu, bogus)])
    assert info.value.name == "CUDA_ERROR_INVALID_VALUE"
    assert driver.get_state(h.pid) is CudaState.CHECKPOINTED
    assert session.rollback() == []
    assert driver.get_state(h.pid) is CudaState.RUNNING
    assert h.check()["intact"]
