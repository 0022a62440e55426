"""The engine's view of CUDA: which pids need the CUDA steps, and a session over them.

gpusnap.cuda.discover looks in /proc first (a /dev/nvidia* fd or a libcuda mapping) and
asks the driver only about those pids, so on a host without a GPU libcuda is never loaded.
"""

from __future__ import annotations

import threading


def cuda_pids(pids: list[int]) -> list[int]:
    from ..cuda import discover
    return discover.cuda_pids(pids)


def session(pids: list[int]):
    from ..cuda.session import CudaSession
    return CudaSession(pids)


def init_in_background() -> threading.Thread:
    """cuInit in gpusnap's own process, on a thread: it takes from a tenth of a second to
    seconds (GPUs out of persistence mode), and restore needs it only once CRIU is done,
    so it overlaps CRIU restore. The caller joins the thread before
    its first CUDA call (cuInit is thread-safe and idempotent anyway)."""
    from ..cuda.driver import get_driver

    def init():
        try:
            get_driver().init()
        except Exception:  # noqa: BLE001 - the CUDA restore itself reports a driver problem
            pass
    thread = threading.Thread(target=init, name="gpusnap-cuinit", daemon=True)
    thread.start()
    return thread


def plan_remap(cuda_facts: dict, choice: list[str] | None) -> tuple[list[tuple[str, str]] | None, list[str]]:
    """UUID pairs for the driver (None: same GPUs) and notes for the user; refuses early."""
    from ..cuda import host_gpus
    from ..remap import plan_remap as plan
    p = plan(cuda_facts.get("gpus", []), [g.to_dict() for g in host_gpus().gpus], choice,
             cuda_facts.get("used_memory"))
    return p.pairs, p.notes
