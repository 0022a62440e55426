"""discover without a GPU: the /proc pre-check, CUDA_VISIBLE_DEVICES, per-GPU memory."""

from __future__ import annotations

import os

from gpusnap.cuda import discover
from gpusnap.cuda.discover import GpuInfo, GpuProcess, HostGpus, parse_visible
from gpusnap.errors import CudaFailed

GIB = 1 << 30
GPUS = [GpuInfo(i, f"GPU-{i}a{i}b0000-1111-2222-3333-444444444444", "NVIDIA H100 80GB HBM3",
                80 * GIB, 70 * GIB, f"00000000:0{i}:00.0", i) for i in range(4)]


class NoDriver:
    def get_state(self, pid):
        raise AssertionError("the driver must not be asked")


class StateDriver:
    def __init__(self, cuda):
        self.cuda = set(cuda)

    def get_state(self, pid):
        if pid not in self.cuda:
            raise CudaFailed("not a CUDA process")
        return 0


def test_gone_pid_does_not_touch_nvidia():
    assert discover.touches_nvidia(2 ** 22 + 12345) is False


def test_no_candidates_never_asks_the_driver():
    assert discover.cuda_pids([2 ** 22 + 12345], NoDriver()) == []


def test_driver_decides_among_candidates(monkeypatch):
    monkeypatch.setattr(discover, "touches_nvidia", lambda pid: pid != 30)
    me = os.getpid()
    assert discover.cuda_pids([10, 20, 30, me], StateDriver({20, 30, me})) == [20]


def test_parse_visible():
    assert parse_visible(None, GPUS) is None
    assert parse_visible("2,0", GPUS) == [GPUS[0], GPUS[2]]
    assert parse_visible("1,1", GPUS) == [GPUS[1]]
    assert parse_visible(GPUS[3].uuid, GPUS) == [GPUS[3]]
    assert parse_visible("GPU-3a3", GPUS) == [GPUS[3]]
    assert parse_visible("1,-1,2", GPUS) == [GPUS[1]]        # CUDA stops at -1
    assert parse_visible("7", GPUS) is None
    assert parse_visible("MIG-abc", GPUS) is None
    assert parse_visible("", GPUS) is None


def test_visible_gpus_union_and_fallback(monkeypatch):
    env = {1: "0", 2: "2", 3: None}
    monkeypatch.setattr(discover, "_environ_value", lambda pid, key: env[pid])
    assert discover.visible_gpus(GPUS, [1, 2]) == [GPUS[0], GPUS[2]]
    assert discover.visible_gpus(GPUS, [1, 3]) == GPUS


def test_environ_of_a_gone_pid():
    assert discover._environ_value(2 ** 22 + 12345, "CUDA_VISIBLE_DEVICES") is None


def test_used_memory_sums_per_gpu():
    host = HostGpus("580.159.04", 13000, GPUS, [
        GpuProcess(1, GPUS[0].uuid, GIB), GpuProcess(1, GPUS[1].uuid, 2 * GIB),
        GpuProcess(2, GPUS[0].uuid, 4 * GIB), GpuProcess(3, GPUS[0].uuid, None)])
    assert host.used_memory([1, 2, 3]) == {GPUS[0].uuid: 5 * GIB, GPUS[1].uuid: 2 * GIB}
    d = host.to_dict()
    assert d["gpus"][0]["uuid"] == GPUS[0].uuid and d["processes"][3]["used_memory"] is None
