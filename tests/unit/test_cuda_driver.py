"""The ctypes binding without a GPU: layouts, lazy loading, and its errors."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest

from gpusnap import sysrun
from gpusnap.cuda import driver as drv
from gpusnap.cuda.driver import CudaCallFailed, CudaDriver, CudaState
from gpusnap.errors import CudaFailed, CudaUnavailable, GpuMismatch

ROOT = Path(__file__).resolve().parents[2]
A = "GPU-00112233-4455-6677-8899-aabbccddeeff"
B = "GPU-ffeeddcc-bbaa-9988-7766-554433221100"


@pytest.mark.parametrize("struct, size, offsets", [
    (drv.CUuuid, 16, {"bytes": 0}),
    (drv.CUcheckpointLockArgs, 64, {"timeoutMs": 0, "reserved0": 4, "reserved1": 8}),
    (drv.CUcheckpointCheckpointArgs, 64, {"reserved": 0}),
    (drv.CUcheckpointUnlockArgs, 64, {"reserved": 0}),
    (drv.CUcheckpointGpuPair, 32, {"oldUuid": 0, "newUuid": 16}),
    (drv.CUcheckpointRestoreArgs, 64, {"gpuPairs": 0, "gpuPairsCount": 8, "padding0": 12,
                                       "reserved": 16}),
])
def test_struct_layout_matches_cuda_h(struct, size, offsets):
    assert ctypes.sizeof(struct) == size
    assert {name: getattr(struct, name).offset for name in offsets} == offsets


def test_states_match_cuprocessstate():
    assert [s.value for s in (CudaState.RUNNING, CudaState.LOCKED, CudaState.CHECKPOINTED,
                              CudaState.FAILED)] == [0, 1, 2, 3]


def test_uuid_round_trip_and_refusal():
    assert drv.uuid_str(drv.uuid_bytes(A)) == A
    assert drv.uuid_bytes(A)[:2] == b"\x00\x11"
    for bad in ("GPU-1234", "MIG-00112233-4455-6677-8899-aabbccddeeff", "GPU-zz" + "0" * 30):
        with pytest.raises(GpuMismatch):
            drv.uuid_bytes(bad)


def test_gpu_pairs_keep_nul_bytes():
    arr = drv.gpu_pairs([(A, B), (B, A)])
    assert [drv.uuid_str(bytes(p.oldUuid.bytes)) for p in arr] == [A, B]
    assert [drv.uuid_str(bytes(p.newUuid.bytes)) for p in arr] == [B, A]


def test_import_loads_neither_libcuda_nor_nvml():
    code = ("import sys, gpusnap.cuda, gpusnap.cuda.session, gpusnap.cuda.discover, "
            "gpusnap.remap; gpusnap.cuda.get_driver(); "
            "maps = open('/proc/self/maps').read(); "
            "print('libcuda' in maps, 'pynvml' in sys.modules)")
    result = sysrun.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT)})
    assert result.ok, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_missing_libcuda_is_cuda_unavailable():
    d = CudaDriver("libcuda-not-here.so.1")
    with pytest.raises(CudaUnavailable, match="cannot load") as info:
        d.get_state(1)
    assert info.value.exit_code == 20 and info.value.hint


def test_driver_without_checkpoint_api_is_cuda_unavailable():
    d = CudaDriver("libc.so.6")
    with pytest.raises(CudaUnavailable, match="predates the CUDA checkpoint API"):
        d.version()
    assert not d.loaded


def test_remap_on_old_driver_refused_before_loading(monkeypatch):
    d = CudaDriver("libcuda-not-here.so.1")
    monkeypatch.setattr(d, "display_version", lambda: "570.124.06")
    with pytest.raises(CudaUnavailable, match=">= 580") as info:
        d.restore(1234, [(A, B)])
    assert "570.124.06" in info.value.message and info.value.hint
    assert not d.loaded


@pytest.mark.parametrize("text, version", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Thu Oct 30 2025\n",
     "580.159.04"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.124.06  Release Build\n",
     "570.124.06"),
    ("garbage\n", None),
])
def test_display_version_parsing(tmp_path, text, version):
    path = tmp_path / "version"
    path.write_text(text)
    assert drv.read_display_version(str(path)) == version


def test_display_version_unreadable():
    assert drv.read_display_version("/nonexistent/version") is None


@pytest.mark.parametrize("cuda, major", [(13000, 580), (13010, 580), (12090, 575),
                                         (12080, 570), (12040, 550), (12020, 0)])
def test_driver_major_from_cuda_version(cuda, major):
    assert drv.driver_major_from_cuda(cuda) == major


class FakeLib:
    """Stands in for libcuda: records the argument structs each call received."""

    def __init__(self, results=None):
        self.results = results or {}
        self.args = {}

    def __getattr__(self, name):
        def call(*args):
            self.args[name] = [getattr(a, "_obj", a) for a in args]
            return self.results.get(name, 0)
        return call


def fake_driver(monkeypatch, **results) -> tuple[CudaDriver, FakeLib]:
    d, lib = CudaDriver("fake"), FakeLib(results)
    d._lib = lib
    monkeypatch.setattr(d, "error_name", lambda code: {909: "CUDA_ERROR_TIMEOUT"}.get(
        code, f"CUresult {code}"))
    monkeypatch.setattr(d, "display_version", lambda: "580.159.04")
    return d, lib


def test_lock_passes_timeout_and_reports_failure(monkeypatch):
    d, lib = fake_driver(monkeypatch, cuCheckpointProcessLock=909)
    with pytest.raises(CudaCallFailed) as info:
        d.lock(4321, 250)
    pid, args = lib.args["cuCheckpointProcessLock"]
    assert pid == 4321 and args.timeoutMs == 250 and args.reserved0 == 0
    err = info.value
    assert isinstance(err, CudaFailed) and err.exit_code == 21
    assert (err.pid, err.code, err.name) == (4321, 909, "CUDA_ERROR_TIMEOUT")
    assert "cuCheckpointProcessLock(pid 4321)" in err.message and "timeout" in err.hint


def test_restore_fills_pairs_and_calls_cuinit_first(monkeypatch):
    d, lib = fake_driver(monkeypatch)
    d.restore(99, [(A, B), (B, A)])
    assert lib.args["cuInit"] == [0]
    pid, args = lib.args["cuCheckpointProcessRestore"]
    assert pid == 99 and args.gpuPairsCount == 2 and args.padding0 == 0
    assert drv.uuid_str(bytes(args.gpuPairs[1].newUuid.bytes)) == A
    d.restore(99)
    _, args = lib.args["cuCheckpointProcessRestore"]
    assert args.gpuPairsCount == 0 and not args.gpuPairs


def test_restore_failure_mentions_failed_cuinit(monkeypatch):
    d, _ = fake_driver(monkeypatch, cuInit=100, cuCheckpointProcessRestore=3)
    with pytest.raises(CudaCallFailed) as info:
        d.restore(7)
    assert "cuInit failed" in info.value.hint


def test_unknown_state_value_is_cuda_failed(monkeypatch):
    d, lib = fake_driver(monkeypatch)

    def get_state(pid, ref):
        ref._obj.value = 42
        return 0
    lib.cuCheckpointProcessGetState = get_state
    with pytest.raises(CudaFailed, match="unknown CUDA process state 42"):
        d.get_state(5)
