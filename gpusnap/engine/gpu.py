"""The engine's view of CUDA: which pids need the CUDA steps, and a session over them.

The cheap test (a /dev/nvidia* fd) runs first and never loads libcuda, so gpusnap on a
host without a GPU never touches the driver.
"""

from __future__ import annotations

import os


def holds_nvidia_fd(pid: int) -> bool:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/nvidia"):
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def cuda_pids(pids: list[int]) -> list[int]:
    candidates = [p for p in pids if holds_nvidia_fd(p)]
    if not candidates:
        return []
    from ..cuda import discover
    return discover.cuda_pids(candidates)


def session(pids: list[int]):
    from ..cuda.session import CudaSession
    return CudaSession(pids)


def plan_remap(cuda_facts: dict, choice: list[str] | None) -> tuple[list[tuple[str, str]] | None, list[str]]:
    """UUID pairs for the driver (None: same GPUs) and notes for the user; refuses early."""
    from ..cuda import host_gpus
    from ..remap import plan_remap as plan
    p = plan(cuda_facts.get("gpus", []), [g.to_dict() for g in host_gpus().gpus], choice,
             cuda_facts.get("used_memory"))
    return p.pairs, p.notes
