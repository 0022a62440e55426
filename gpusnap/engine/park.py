"""Park and resume in place: the target stays alive on the host, its GPU is freed.

Suspend (no CRIU), every check before anything is touched (plan_suspend):
    SDK agents drop their weights   <- they read them back
    cuda lock                       <- unlock
    cuda checkpoint                 <- cuda restore (device memory back from host memory)
    the entry in the state dir      <- the entry it replaced, or none (engine/parked.py)

Resume (of a suspended target, or of a standby left by `restore --standby`):
    cuda restore (same GPUs, or --gpu: gpusnap.remap)   <- checkpoint again
    cuda unlock                                          <- lock and checkpoint again
    SDK agents read their weights back                   <- (the two above)
    the entry goes (a standby's becomes 'restored')
A resume that fails leaves the target parked as it was, its entry kept, to try again.

Refused: a target with no CUDA process (NoCudaProcess: nothing would be freed), one
whose CUDA processes are not all RUNNING (someone else holds them), one already parked,
and a NCCL job that may use CUDA IPC peer memory (cuda/nccl.py; --force).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil

from .. import interrupts
from ..cuda import hugepages
from ..errors import CudaFailed, GpusnapError, NoCudaProcess, NotParked, UsageError
from ..model import Target
from ..model.fields import Fields
from ..model.manifest import CudaFacts, SdkRecord
from ..targets.process import GONE, tree_pids, tree_rss
from . import agent_steps, gpu, parked, strategies
from .plans import DumpRequest, Strategy
from .timing import Stages


@dataclass
class SuspendRequest:
    pid: int | None = None
    container: str | None = None
    engine: str | None = None
    lock_timeout_ms: int = 10_000
    force: bool = False             # suspend a NCCL job that may use CUDA IPC anyway


@dataclass
class SuspendPlan:
    request: SuspendRequest
    target: Target
    strategy: Strategy
    cuda_pids: list[int]
    collective_pids: list[int] = field(default_factory=list)   # NCCL ranks whose agent must prepare


@dataclass
class ResumeRequest:
    pid: int | None = None
    container: str | None = None
    gpus: list[str] | None = None
    freed: dict[str, int] | None = None     # device memory freed before it runs, per GPU UUID


@dataclass
class ResumePlan:
    request: ResumeRequest
    entry: dict                     # the state dir's entry of the parked target
    gpu_pairs: list[tuple[str, str]] | None = None
    move: gpu.GpuMove | None = None         # the GPUs it was planned with
    notes: list[str] = field(default_factory=list)
    cuinit: threading.Thread | None = None   # cuInit, started while the plan is made
    planned_s: float = 0.0          # how long planning took (stage 'plan' of the resume)


def _one_target(pid, container) -> None:
    if (pid is None) == (container is None):
        raise UsageError("name a container or a pid, not both")


def plan_suspend(req: SuspendRequest) -> SuspendPlan:
    """Every check that can fail, before the target is touched."""
    _one_target(req.pid, req.container)
    strategy, target = strategies.resolve(DumpRequest(pid=req.pid, container=req.container,
                                                      engine=req.engine))
    held = parked.lookup(target.root_pid)
    if held and held["state"] in parked.PARKED:
        raise UsageError(f"{_what(target)} is already parked ({held['state']})",
                         hint=f"gpusnap resume {target.root_pid}")
    collective_pids = [] if req.force else \
        gpu.refuse_nccl_ipc(target.pids, "suspend", strategy.sdk_agents)
    cuda_pids = gpu.cuda_pids(target.pids)
    if not cuda_pids:
        raise NoCudaProcess(f"no CUDA process in {_what(target)}: suspend frees GPU memory "
                            f"and this target holds none", hint="gpusnap dump stores any process")
    parked.state_dir()                  # usable, or refused now
    return SuspendPlan(req, target, strategy, cuda_pids, collective_pids)


def _what(target: Target) -> str:
    return f"{target.kind} {target.name}" if target.kind != "process" \
        else f"process {target.root_pid}"


def execute_suspend(plan: SuspendPlan) -> dict:
    """Suspend; returns the recorded entry with 'timings' and 'notes'."""
    stages, target = Stages(), plan.target
    cuda = gpu.session(plan.cuda_pids)
    not_running = {p: s.name for p, s in cuda.initial.items() if s.name != "RUNNING"}
    if not_running:
        raise CudaFailed(f"CUDA processes not RUNNING: {not_running}; something else holds "
                         f"them", hint="gpusnap suspends only processes it finds running")
    sdk = agent_steps.DumpAgents(target, ask=plan.strategy.sdk_agents,
                                 required=plan.collective_pids)
    recorded, replaced = False, None
    try:
        sdk.prepare(stages)             # SDK: before the lock; failure -> transparent
        facts = cuda.describe()
        with stages.stage("cuda_lock"):
            cuda.lock_all(plan.request.lock_timeout_ms)
        with stages.stage("cuda_checkpoint"):
            cuda.checkpoint_all()
        with stages.stage("record"):
            # set before the write: an interrupt once the entry is in place (its directory
            # synced, the stage recorded) must take it back, or it says suspended while
            # the target runs; the entry it replaces (a 'restored' one) comes back
            replaced = parked.lookup(target.root_pid)
            recorded = True
            entry = parked.record({
                "pid": target.root_pid, "pids": target.pids, "state": "suspended",
                "kind": target.kind, "name": target.name, "container": target.container or None,
                "cuda_pids": plan.cuda_pids, "cuda": facts.to_json(),
                "sdk": _json_or_none(sdk.record()),
                "snapshot": None, "since": time.time()})
    except BaseException as exc:
        with interrupts.shielded():
            cuda.rollback()
            undo_errors = [e.message for e in cuda.errors] + sdk.undo()
            if recorded:
                parked.put_back(target.root_pid, replaced, undo_errors)
        if isinstance(exc, GpusnapError) and undo_errors:
            exc.hint = "; ".join(filter(None, [exc.hint, *undo_errors]))
        raise
    return dict(entry, host_memory=tree_rss(target.pids), timings=stages.to_dict(),
                notes=[*sdk.notes, *hugepages.notes(cuda)])


def plan_resume(req: ResumeRequest) -> ResumePlan:
    """The parked target's entry and where its GPUs go; refuses early."""
    started = time.perf_counter()
    entry = parked_entry(req)
    # cuInit (a restore needs it in gpusnap's process) overlaps planning's NVML queries
    plan = ResumePlan(req, entry, cuinit=gpu.init_in_background() if entry.get("cuda_pids") else None)
    if entry.get("container") and req.gpus:
        raise UsageError("a container keeps its GPU device nodes: it resumes on its own GPUs",
                         hint="dump it and restore with --gpu to move it")
    if entry.get("cuda") and (req.gpus or not entry.get("container")):
        move = gpu.plan_remap(CudaFacts.from_json(Fields(entry["cuda"], "parked.cuda")), req.gpus,
                              freed=req.freed)
        plan.gpu_pairs, plan.notes, plan.move = move.pairs, move.notes, move
    plan.planned_s = time.perf_counter() - started
    return plan


def parked_entry(req: ResumeRequest) -> dict:
    """The state dir's entry of the parked target req names (NotParked: none)."""
    _one_target(req.pid, req.container)
    entry = parked.lookup(req.pid, req.container)
    if not entry or entry["state"] not in parked.PARKED:
        raise NotParked(f"gpusnap holds nothing parked for {req.container or req.pid}",
                        hint="gpusnap ps lists what it holds")
    return entry


def execute_resume(plan: ResumePlan) -> dict:
    """Resume; returns {pid, state, gpu_pairs, sdk, timings, notes}."""
    entry, stages = plan.entry, Stages()
    stages.seconds["plan"] = plan.planned_s
    with stages.stage("cuda_state"):
        cuda = gpu.session(entry["cuda_pids"])
    sdk = None
    try:
        if plan.cuinit:
            with stages.stage("cuda_init_wait"):
                plan.cuinit.join()
        with stages.stage("cuda_restore"):
            cuda.restore_all(plan.gpu_pairs)
        with stages.stage("cuda_unlock"):
            cuda.unlock_all()
        sdk = agent_steps.resume_agents(
            SdkRecord.from_json(Fields(entry["sdk"], "parked.sdk")) if entry.get("sdk") else None,
            entry["pids"] or [entry["pid"]], stages)
    except BaseException as exc:
        errors = cuda.rollback()        # parked again, as it was found
        if isinstance(exc, GpusnapError) and errors:
            exc.hint = "; ".join(filter(None, [exc.hint, *(e.message for e in errors)]))
        raise
    with interrupts.shielded(), stages.stage("record"):     # it runs: the entry must not say parked
        parked.forget(entry["pid"])
        if entry["state"] == "standby":
            parked.record_quietly(dict(entry, state="restored", since=time.time()), plan.notes)
    return {"pid": entry["pid"], "state": "running", "was": entry["state"],
            "gpu_pairs": [list(p) for p in plan.gpu_pairs or []] or None, "sdk": sdk,
            "timings": stages.to_dict(), "notes": plan.notes}


def _json_or_none(record):
    return record.to_json() if record is not None else None


def ps() -> list[dict]:
    """What gpusnap holds, each entry with the host memory its tree holds now."""
    return [dict(e, host_memory=tree_rss(_live_tree(e["pid"]))) for e in parked.entries()]


def _live_tree(pid: int) -> list[int]:
    try:
        return tree_pids(pid)
    except GONE:
        return []
