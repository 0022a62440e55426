"""Park and resume in place, standbys, and a TP=2 NCCL job, on real GPUs.

Run on the GPU machine (pytest -m gpu tests/gpu). The TP=2 tests need two GPUs and skip
otherwise; every process they start keeps NVLink multicast off.
"""

from __future__ import annotations

import os

import psutil
import pytest

from tests.workloads.common import evidence
from tests.workloads.tp_allreduce import TensorParallel

pytestmark = [pytest.mark.gpu, pytest.mark.root]


def _state(pid: int) -> str:
    from gpusnap.cuda import get_driver
    return get_driver().get_state(pid).name


def _gpu_use(pid: int) -> dict[str, int]:
    """Device memory pid holds, per GPU UUID (NVML)."""
    from gpusnap.cuda import host_gpus
    return host_gpus().used_memory([pid])


def _wait_free(pids, timeout: float = 30) -> None:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.02)


def _two_gpus() -> list:
    from gpusnap.cuda import host_gpus
    gpus = host_gpus().gpus
    if len(gpus) < 2:
        pytest.skip("needs two GPUs")
    return gpus


def test_suspend_frees_the_gpu_and_resume_brings_the_data_back(start_holder, gpusnap):
    holder = start_holder(gib=2.0, mode="graphs")
    before = holder.check()
    rc, out, err = gpusnap("suspend", str(holder.pid))
    assert rc == 0, err
    assert out["state"] == "suspended" and out["cuda_pids"] == [holder.pid]
    assert _state(holder.pid) == "CHECKPOINTED"
    assert psutil.pid_exists(holder.pid), "the process stays alive on the host"
    assert not _gpu_use(holder.pid), "its device memory is off the GPU"
    assert out["host_memory"] >= 2 << 30
    assert [(r["pid"], r["state"]) for r in gpusnap("ps")[1]] == [(holder.pid, "suspended")]
    rc, out, err = gpusnap("suspend", str(holder.pid))
    assert rc == 2, "already parked"

    rc, out, err = gpusnap("resume", str(holder.pid))
    assert rc == 0, err
    assert _state(holder.pid) == "RUNNING"
    after = holder.check()
    assert after["intact"] and after["graphs_ok"] and after["checksum"] == before["checksum"]
    assert gpusnap("ps")[1] == []


def test_a_resume_refused_leaves_it_parked_and_another_gpu_works(start_holder, gpusnap):
    holder = start_holder(gib=1.0, mode="idle")
    rc, _, err = gpusnap("suspend", str(holder.pid))
    assert rc == 0, err
    rc, out, err = gpusnap("resume", str(holder.pid), "--gpu", "99")
    assert rc == 22, err
    assert _state(holder.pid) == "CHECKPOINTED"
    from gpusnap.cuda import host_gpus
    gpus = host_gpus().gpus
    where = ["--gpu", "1"] if len(gpus) > 1 else []
    rc, out, err = gpusnap("resume", str(holder.pid), *where)
    assert rc == 0, err
    assert holder.check()["intact"]
    if where:
        assert list(_gpu_use(holder.pid)) == [gpus[1].uuid]


def test_standby_holds_no_gpu_and_resume_finishes_it(start_holder, gpusnap):
    holder = start_holder(gib=1.0, mode="graphs")
    before = holder.check()
    rc, snap, err = gpusnap("dump", "--pid", str(holder.pid))
    assert rc == 0, err
    pid = holder.pid
    holder.stop()
    _wait_free([pid])
    rc, out, err = gpusnap("restore", snap["id"], "--standby")
    assert rc == 0, err
    assert out["pid"] == pid and _state(pid) == "CHECKPOINTED"
    assert not _gpu_use(pid)
    assert out["standby"]["host_memory"] >= 1 << 30
    assert [(r["pid"], r["state"]) for r in gpusnap("ps")[1]] == [(pid, "standby")]
    rc, res, err = gpusnap("resume", str(pid))
    assert rc == 0, err
    assert res["was"] == "standby" and "cuda_restore" in res["timings"]
    holder.pid = pid
    after = holder.check()
    assert after["intact"] and after["graphs_ok"] and after["checksum"] == before["checksum"]
    assert [(r["pid"], r["state"]) for r in gpusnap("ps")[1]] == [(pid, "restored")]
    holder.stop()


@pytest.fixture
def tensor_parallel(tmp_path):
    started = []

    def start(**kw) -> TensorParallel:
        _two_gpus()
        d = tmp_path / f"tp{len(started)}"
        d.mkdir()
        tp = TensorParallel(str(d), **kw)
        started.append(tp)
        return tp.start()

    yield start
    for tp in started:
        tp.stop()


def _all_good(results: list[dict], context: str = "") -> None:
    for r in results:
        assert r["intact"] and r["allreduce_ok"] and r["failures"] == 0, f"{r}\n{context}"


def test_tp2_with_nccl_defaults_is_refused_before_anything_is_touched(tensor_parallel, gpusnap):
    tp = tensor_parallel(mib=64, unsafe=True)
    _all_good(tp.check())
    for args in (("dump", "--pid", str(tp.pid)), ("suspend", str(tp.pid))):
        rc, out, err = gpusnap(*args)
        assert rc == 23, err
        assert "NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0" in out["hint"]
        assert [_state(p) for p in tp.ranks] == ["RUNNING", "RUNNING"]
    _all_good(tp.check())


def _evidence(step: str, rc, out, err: str, tp: TensorParallel) -> str:
    return evidence(step, rc, out, err, tp.logs())


def _dump_restore(tp: TensorParallel, gpusnap, *restore_args) -> dict:
    before = [r["checksum"] for r in tp.check()]
    rc, snap, err = gpusnap("dump", "--pid", str(tp.pid))
    assert rc == 0, _evidence("dump", rc, snap, err, tp)
    info = gpusnap("inspect", snap["id"])[1]
    assert sorted(info["cuda"]["pids"]) == sorted(tp.ranks), _evidence("inspect", 0, info, "", tp)
    tp.reap()
    _wait_free([tp.pid, *tp.ranks])
    rc, res, err = gpusnap("restore", snap["id"], *restore_args)
    def said() -> str:           # read when an assertion fails: the logs as they are then
        return _evidence(f"restore {' '.join(restore_args)}", rc, res, err, tp)
    assert rc == 0, said()
    assert res["pid"] == tp.pid, said()
    try:
        after = tp.check(timeout=60)
    except TimeoutError as e:
        raise AssertionError(f"{e}{said()}") from None
    if not all(r["intact"] and r["allreduce_ok"] and r["failures"] == 0 for r in after):
        _all_good(after, said())
    assert [r["checksum"] for r in after] == before, said()
    return res


def test_tp2_dump_and_restore_then_onto_the_gpus_swapped(tensor_parallel, gpusnap):
    gpus = _two_gpus()
    tp = tensor_parallel(mib=256)
    _all_good(tp.check())
    _dump_restore(tp, gpusnap)
    res = _dump_restore(tp, gpusnap, "--gpu", "1,0")
    for rank, gpu in ((0, gpus[1]), (1, gpus[0])):
        use = _gpu_use(tp.ranks[rank])
        assert use and max(use, key=use.get) == gpu.uuid, \
            f"rank {rank} runs on GPU {gpu.index} now; NVML: {use}" + \
            _evidence("restore --gpu 1,0", 0, res, "", tp)


def test_tp2_suspend_and_resume_in_place(tensor_parallel, gpusnap):
    tp = tensor_parallel(mib=256)
    before = [r["checksum"] for r in tp.check()]
    rc, out, err = gpusnap("suspend", str(tp.pid))
    assert rc == 0, err
    assert sorted(out["cuda_pids"]) == sorted(tp.ranks)
    assert [_state(p) for p in tp.ranks] == ["CHECKPOINTED", "CHECKPOINTED"]
    rc, out, err = gpusnap("resume", str(tp.pid))
    assert rc == 0, err
    after = tp.check()
    _all_good(after)
    assert [r["checksum"] for r in after] == before
    if os.environ.get("GPUSNAP_RESULTS"):
        import json
        with open(os.path.join(os.environ["GPUSNAP_RESULTS"], "tp2_park.json"), "w") as f:
            json.dump({"resume_timings": out["timings"]}, f, indent=1)


def test_switch_overlapped_and_in_turn_and_a_refusal_touches_nothing(start_holder, gpusnap):
    a = start_holder(gib=2.0, mode="graphs")
    b = start_holder(gib=1.0, mode="graphs")
    sums = {a.pid: a.check()["checksum"], b.pid: b.check()["checksum"]}
    rc, _, err = gpusnap("suspend", str(b.pid))
    assert rc == 0, err

    rc, out, err = gpusnap("switch", str(a.pid), str(b.pid))
    assert rc == 0, err
    assert out["overlapped"], out["reason"]           # 3 GiB: they fit side by side
    assert _state(a.pid) == "CHECKPOINTED" and _state(b.pid) == "RUNNING"
    assert not _gpu_use(a.pid) and _gpu_use(b.pid)
    after = b.check()
    assert after["intact"] and after["graphs_ok"] and after["checksum"] == sums[b.pid]
    assert [(r["pid"], r["state"]) for r in gpusnap("ps")[1]] == [(a.pid, "suspended")]

    rc, _, err = gpusnap("switch", str(b.pid), str(a.pid), "--gpu", "99")
    assert rc == 22, err                              # refused when planned: nothing touched
    assert _state(a.pid) == "CHECKPOINTED" and _state(b.pid) == "RUNNING"

    rc, out, err = gpusnap("switch", str(b.pid), str(a.pid), "--sequential")
    assert rc == 0, err
    assert not out["overlapped"] and "--sequential" in out["reason"]
    assert set(out["timings"]) >= {"suspend", "resume", "switch"}
    assert _state(a.pid) == "RUNNING" and _state(b.pid) == "CHECKPOINTED"
    after = a.check()
    assert after["intact"] and after["graphs_ok"] and after["checksum"] == sums[a.pid]
    rc, _, err = gpusnap("resume", str(b.pid))
    assert rc == 0, err
    assert b.check()["checksum"] == sums[b.pid]
