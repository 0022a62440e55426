"""`gpusnap demo`: start a workload with known data, dump it, restore it, check the data.

On a host with an NVIDIA GPU and the CUDA checkpoint API the workload holds its data in
GPU memory (PyTorch); elsewhere it is the CPU memholder (a process tree with pipes,
sockets, threads and a mapped file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from ..errors import GpusnapError
from ..store import Repository
from . import dump, restore


class DemoFailed(GpusnapError):
    """The demo's workload did not come back intact."""
    exit_code = 1


@dataclass
class DemoResult:
    workload: str
    snapshot: str
    restored_pid: int
    bytes_logical: int
    bytes_new: int
    stages: dict[str, float]
    report: dict = field(default_factory=dict)


def gpu_available() -> bool:
    if not os.path.exists("/dev/nvidiactl"):
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _start(argv: list[str], state: str) -> subprocess.Popen:
    out = open(os.path.join(state, "workload.log"), "ab")
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            start_new_session=True, close_fds=True)


def _wait_file(path: str, proc: subprocess.Popen | None, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        if proc is not None and proc.poll() is not None:
            raise DemoFailed(f"the workload exited with {proc.returncode} before it was ready")
        time.sleep(0.05)
    raise DemoFailed(f"timed out waiting for {path}")


def run(repo: Repository, *, mib: int = 256, cuda: bool | None = None) -> DemoResult:
    cuda = gpu_available() if cuda is None else cuda
    state = tempfile.mkdtemp(prefix="gpusnap-demo-")
    if cuda:
        argv = [sys.executable, "-m", "gpusnap.workloads.torch_holder", "--state", state,
                "--gib", str(max(1, mib // 1024))]
        workload = "cuda"
    else:
        argv = [sys.executable, "-m", "gpusnap.workloads.memholder", "--state", state,
                "--mib", str(mib), "--children", "2", "--threads", "2",
                "--mmap-file", os.path.join(state, "mapped")]
        workload = "cpu"
    proc = _start(argv, state)
    restored_pid = None
    try:
        ready = _wait_file(os.path.join(state, "ready"), proc, 120)
        d_plan = dump.plan(dump.DumpRequest(pid=ready["pid"], name="gpusnap-demo"))
        manifest = dump.execute(d_plan, repo)
        proc.wait()
        r_plan = restore.plan(restore.RestoreRequest(snapshot=manifest["id"]), repo)
        result = restore.execute(r_plan, repo)
        restored_pid = result["pid"]
        report_path = os.path.join(state, "report.json")
        if os.path.exists(report_path):
            os.unlink(report_path)
        os.kill(restored_pid, 10)  # SIGUSR1: check your data
        report = _wait_file(report_path, None, 60)
        ok = report.get("data_ok") and report.get("children_ok", True) is not False
        if not ok:
            raise DemoFailed(f"restored workload reports damage: {report}")
        return DemoResult(workload, manifest["id"], restored_pid, manifest["bytes_logical"],
                          manifest["bytes_new"], {**manifest["timings"], **result["timings"]}, report)
    finally:
        from ..targets.process import kill_and_wait
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if restored_pid:
            kill_and_wait(_tree(restored_pid))


def _tree(root: int) -> list[int]:
    import psutil
    try:
        return [root] + [p.pid for p in psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return [root]
