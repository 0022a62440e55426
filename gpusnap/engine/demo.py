"""`gpusnap demo`: start a workload with known data, dump it, restore it, check the data.

On a host with an NVIDIA GPU and the CUDA checkpoint API the workload holds its data in
GPU memory (PyTorch); elsewhere it is the CPU memholder (a process tree with pipes,
sockets, threads and a mapped file).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .. import sysrun
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


class _CpuWorkload:
    """The memholder tree: pipes, sockets, threads, a mapped file, known data."""
    name = "cpu"

    def __init__(self, state: str, mib: int):
        from ..workloads import memholder
        self.state = state
        self.proc = sysrun.start([sys.executable, memholder.__file__, "--state", state,
                                  "--mib", str(mib), "--children", "2", "--threads", "2",
                                  "--mmap-file", os.path.join(state, "mapped")],
                                 stdout=os.path.join(state, "workload.log"))
        self.pid = _wait_file(os.path.join(state, "ready"), self.proc, 120)["pid"]

    def reap(self) -> None:
        self.proc.wait()

    def check(self, pid: int) -> tuple[bool, dict]:
        report_path = os.path.join(self.state, "report.json")
        if os.path.exists(report_path):
            os.unlink(report_path)
        os.kill(pid, signal.SIGUSR1)
        report = _wait_file(report_path, None, 60)
        return bool(report.get("data_ok") and report.get("children_ok")), report

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class _CudaWorkload:
    """A PyTorch process holding known data in GPU memory, replaying CUDA graphs."""
    name = "cuda"

    def __init__(self, state: str, mib: int):
        from ..workloads.torch_holder import Holder
        self.holder = Holder(state, gib=max(0.25, mib / 1024), mode="graphs").start()
        self.pid = self.holder.pid

    def reap(self) -> None:
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass

    def check(self, pid: int) -> tuple[bool, dict]:
        self.holder.pid = pid
        result = self.holder.check()
        ok = bool(result.get("intact")) and result.get("checksum") == self.holder.checksum
        return ok, result

    def stop(self) -> None:
        pass


def run(repo: Repository, *, mib: int = 256, cuda: bool | None = None) -> DemoResult:
    cuda = gpu_available() if cuda is None else cuda
    state = tempfile.mkdtemp(prefix="gpusnap-demo-")
    work = (_CudaWorkload if cuda else _CpuWorkload)(state, mib)
    restored_pid = None
    try:
        manifest = dump.execute(dump.plan(dump.DumpRequest(pid=work.pid, name="gpusnap-demo")), repo)
        work.reap()
        r_plan = restore.plan(restore.RestoreRequest(snapshot=manifest.id), repo)
        result = restore.execute(r_plan, repo)
        restored_pid = result["pid"]
        ok, report = work.check(restored_pid)
        if not ok:
            raise DemoFailed(f"restored workload reports damage: {report}")
        report["data_ok"] = ok
        return DemoResult(work.name, manifest.id, restored_pid, manifest.bytes_logical,
                          manifest.bytes_new, {**manifest.timings, **result["timings"]}, report)
    finally:
        from ..targets.process import kill_and_wait, restored_tree
        work.stop()
        if restored_pid:
            kill_and_wait(restored_tree(restored_pid, [restored_pid]))
        shutil.rmtree(state, ignore_errors=True)
