"""The engine's view of CUDA: which pids need the CUDA steps, and a session over them.

gpusnap.cuda.discover looks in /proc first (a /dev/nvidia* fd or a libcuda mapping) and
asks the driver only about those pids, so on a host without a GPU libcuda is never loaded.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..model import CudaFacts


def cuda_pids(pids: list[int]) -> list[int]:
    from ..cuda import discover
    return discover.cuda_pids(pids)


def used_memory(pids: list[int]) -> dict[str, int]:
    """Device memory the pids hold now, per GPU UUID (NVML)."""
    from ..cuda import discover
    return discover.host_gpus().used_memory(pids)


def refuse_nccl_ipc(pids: list[int], what: str, ask_agents: bool = True) -> list[int]:
    """NcclPeerMemory if a pid is a NCCL rank that may use CUDA IPC (cuda/nccl.py),
    unless its SDK agent promises to tear its communicators down before the lock. Returns
    the ranks so spared: their prepare must succeed, or nothing is locked."""
    from ..cuda.nccl import ipc_ranks_of, refuse_ipc_ranks
    ranks = ipc_ranks_of(pids)
    if not ranks:
        return []
    from .agent_steps import releasing_collectives
    spared = releasing_collectives(ranks, pids) if ask_agents else set()
    refuse_ipc_ranks(ranks, what, spared)
    return sorted(spared)


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


_given: list[dict] | None = None


def use_host_gpus(gpus: list[dict]) -> None:
    """The next plan_remap of this process plans with these GPUs (cuda/discover.GpuInfo
    dicts) instead of asking NVML: gpusnapd asks its resident NVML just before it forks a
    restore (daemon/gpufacts.py)."""
    global _given
    _given = gpus


def _host_gpus() -> list[dict]:
    global _given
    if _given is not None:
        gpus, _given = _given, None
        return gpus
    from ..cuda import discover
    return [g.to_dict() for g in discover.host_gpus().gpus]


@dataclass
class GpuMove:
    """Where the CUDA state goes: UUID pairs for the driver (None: the same GPUs), notes
    for the user, and the GPU lists they were planned from (a container's device nodes
    move with them: targets.devices.gpu_device_map)."""
    pairs: list[tuple[str, str]] | None
    notes: list[str]
    snapshot: list[dict]
    host: list[dict]


def plan_remap(cuda_facts: CudaFacts, choice: list[str] | None,
               visible_minors: set[int] | None = None,
               freed: dict[str, int] | None = None) -> GpuMove:
    """gpusnap.remap over the snapshot's GPUs and this host's; refuses early.
    visible_minors: only the snapshot GPUs with these minor numbers (a container sees
    only the GPUs whose nodes it has); none of them known: all. freed: device memory
    (per host GPU UUID) that will be free by the time the restore runs."""
    from ..remap import plan_remap as plan
    snapshot = cuda_facts.gpus
    if visible_minors:
        snapshot = [g for g in snapshot
                    if g.get("minor") is None or g["minor"] in visible_minors] or snapshot
    host = _host_gpus()
    if freed:
        host = [dict(g, memory_free=int(g.get("memory_free") or 0) + freed.get(g["uuid"], 0))
                for g in host]
    p = plan(snapshot, host, choice, cuda_facts.used_memory)
    return GpuMove(p.pairs, list(p.notes), snapshot, host)
