"""Fixtures for tests on a real GPU: the driver, and torch_holder processes.

Every test here is skipped, with the reason, where there is no NVIDIA driver >= 580 with
the checkpoint API, no GPU, or no PyTorch for the workload.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
from pathlib import Path

import pytest

from gpusnap.errors import GpusnapError

ROOT = Path(__file__).resolve().parents[2]
from gpusnap.workloads import torch_holder  # noqa: E402  (imports torch only in the child)


@functools.lru_cache(maxsize=None)
def gpu_unavailable() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (the workload needs it)"
    from gpusnap.cuda import get_driver, host_gpus
    try:
        major = get_driver().driver_major()
        gpus = host_gpus().gpus
    except GpusnapError as e:
        return f"no usable CUDA driver: {e.message}"
    if major < 580:
        return f"NVIDIA driver {major} < 580"
    if not gpus:
        return "no GPU"
    return None


def pytest_runtest_logreport(report):
    """With GPUSNAP_RESULTS set (scripts/gpu-session.sh), each test's outcome is appended
    to progress.txt there as it happens, a failure with its whole report: a step cut by
    its time limit (before pytest's summary) still says which test failed and why."""
    out = os.environ.get("GPUSNAP_RESULTS")
    if not out or (report.when != "call" and report.passed):
        return
    with open(os.path.join(out, "progress.txt"), "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {report.outcome.upper()} {report.nodeid} "
                f"[{report.when}, {report.duration:.1f} s]\n")
        if report.failed:
            f.write(f"{report.longreprtext}\n{report.caplog}\n{report.capstderr[-20000:]}\n")


@pytest.fixture(autouse=True)
def _needs_gpu():
    reason = gpu_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def driver():
    from gpusnap.cuda import get_driver
    return get_driver()


@pytest.fixture
def start_holder(tmp_path):
    """start_holder(gib=1, mode='idle') -> a running Holder, killed after the test."""
    started = []

    def start(gib: float = 1.0, mode: str = "idle"):
        workdir = tmp_path / f"holder{len(started)}"
        workdir.mkdir()
        holder = torch_holder.Holder(str(workdir), gib=gib, mode=mode)
        started.append(holder)
        return holder.start()

    yield start
    for holder in started:
        holder.stop()


@pytest.fixture(scope="module")
def holder(tmp_path_factory):
    """One 1 GiB holder running graphs + cuBLAS on two streams, shared by the tests of a
    module that leave it RUNNING (each test asserts that it does)."""
    reason = gpu_unavailable()
    if reason:
        pytest.skip(reason)
    h = torch_holder.Holder(str(tmp_path_factory.mktemp("holder")), gib=1.0, mode="graphs")
    h.start()
    yield h
    h.stop()
