"""A TP=2 LLM server (tests/workloads/tp_server.py, NCCL with its defaults) that uses
gpusnap.sdk's collectives: dump tears the NCCL communicators down before the CUDA lock and
restore builds them again, so dump -> restore -> same tokens, and onto the two GPUs
swapped. Needs two GPUs (skips otherwise); NVLink multicast stays off in every rank."""

from __future__ import annotations

import pytest

from tests.workloads.common import evidence
from tests.workloads.tp_server import TpServer

pytestmark = [pytest.mark.gpu, pytest.mark.root]


def _two_gpus() -> list:
    from gpusnap.cuda import host_gpus
    gpus = host_gpus().gpus
    if len(gpus) < 2:
        pytest.skip("needs two GPUs")
    return gpus


@pytest.fixture
def tp(tmp_path_factory, tmp_path):
    _two_gpus()
    model = tmp_path_factory.getbasetemp() / "tp-model-1b"
    started = []

    def start(**kw) -> TpServer:
        srv = TpServer(str(model), str(tmp_path / f"state{len(started)}"),
                       port=18170 + len(started), **kw)
        srv.make("1b")
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


def _wait_gone(pids, timeout: float = 30) -> None:
    import time

    import psutil
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.02)


def _said(step: str, rc, out, err: str, srv: TpServer) -> str:
    return evidence(step, rc, out, err, srv.logs())


def _round_trip(srv: TpServer, gpusnap, *restore_args) -> dict:
    rc, snap, err = gpusnap("dump", "--pid", str(srv.pid))
    assert rc == 0, _said("dump", rc, snap, err, srv)
    assert sorted(a["pid"] for a in snap["sdk"]["agents"]) == sorted(srv.ranks), \
        _said("dump", rc, snap, err, srv)
    srv.reap()
    _wait_gone([srv.pid, *srv.ranks])
    rc, res, err = gpusnap("restore", snap["id"], *restore_args)
    assert rc == 0, _said(f"restore {' '.join(restore_args)}", rc, res, err, srv)
    return res


def test_tp2_sdk_with_nccl_defaults_dumps_restores_and_swaps_gpus(tp, gpusnap):
    gpus = _two_gpus()
    srv = tp(sdk=True)
    tokens = srv.generate(8)
    res = _round_trip(srv, gpusnap)
    assert srv.generate(8, timeout=60) == tokens, _said("restore", 0, res, "", srv)
    res = _round_trip(srv, gpusnap, "--gpu", "1,0")
    assert srv.generate(8, timeout=60) == tokens, _said("restore --gpu 1,0", 0, res, "", srv)
    from gpusnap.cuda import host_gpus
    for rank, gpu in ((0, gpus[1]), (1, gpus[0])):
        use = host_gpus().used_memory([srv.ranks[rank]])
        assert use and max(use, key=use.get) == gpu.uuid, \
            f"rank {rank} runs on GPU {gpu.index} now; NVML: {use}" + \
            _said("restore --gpu 1,0", 0, res, "", srv)


def test_tp2_sdk_suspend_and_resume_in_place(tp, gpusnap):
    srv = tp(sdk=True)
    tokens = srv.generate(4)
    rc, out, err = gpusnap("suspend", str(srv.pid))
    assert rc == 0, f"{err}\n{srv.logs()}"
    rc, out, err = gpusnap("resume", str(srv.pid))
    assert rc == 0, f"{err}\n{srv.logs()}"
    assert srv.generate(4) == tokens, srv.logs()


def test_tp2_without_the_sdk_and_nccl_defaults_is_refused(tp, gpusnap):
    srv = tp()
    rc, out, err = gpusnap("dump", "--pid", str(srv.pid))
    assert rc == 23, err
    assert srv.generate(2)
