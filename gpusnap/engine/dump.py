"""Dump: resolve the target, CUDA lock + checkpoint, CRIU dump, ingest, commit.

Order and undo (every step that changes the target has its undo, run on any failure,
Ctrl-C and SIGTERM included):

    cuda lock            <- unlock
    cuda checkpoint      <- cuda restore
    criu dump (stopped)  <- SIGCONT
    ingest, commit       (the store: nothing visible until the manifest is written)
    then: kill the target, or (--leave-running) resume it

Without --leave-running CRIU leaves the tree stopped rather than killing it, so a dump
that fails after CRIU (disk full, say) still resumes the original: the target dies only
once its snapshot is committed.

The "criu dump" step is the target's checkpointer (engine/checkpointer.py): gpusnap's
CRIU for a process tree; for a container, its engine's checkpoint (docker, podman), whose
undo starts the container again from the images just taken.
"""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass, field
from typing import Callable

from .. import VERSION
from ..criu.argv import CriuOptions
from ..criu.locate import find_criu
from ..errors import GpusnapError, Interrupted, UsageError
from ..imagefile import zero_pages
from ..model import Target
from ..store import Repository
from . import agent_steps, checkpointer, gpu, workdir
from .timing import Stages


@dataclass
class DumpRequest:
    pid: int | None = None
    container: str | None = None
    engine: str | None = None
    name: str | None = None
    leave_running: bool = False
    lock_timeout_ms: int = 10_000


@dataclass
class DumpPlan:
    request: DumpRequest
    target: Target
    criu_path: str
    criu_version: str
    cuda_pids: list[int] = field(default_factory=list)
    criu_options: CriuOptions = field(default_factory=CriuOptions)


def plan(req: DumpRequest) -> DumpPlan:
    """Every check that can fail, before the target is touched."""
    if (req.pid is None) == (req.container is None):
        raise UsageError("name a container or give --pid, not both")
    criu_path, criu_version = find_criu()
    if req.pid is not None:
        from ..targets import process
        target = process.resolve(req.pid)
    else:
        from ..targets import containers
        target = containers.resolve(req.container, req.engine)
    return DumpPlan(request=req, target=target, criu_path=criu_path, criu_version=criu_version,
                    cuda_pids=gpu.cuda_pids(target.pids),
                    criu_options=CriuOptions(shell_job=target.shell_job))


def execute(plan: DumpPlan, repo: Repository,
            progress: Callable[[int], None] | None = None) -> dict:
    """Run the dump; returns the committed manifest."""
    req, target = plan.request, plan.target
    stages = Stages()
    cuda = gpu.session(plan.cuda_pids) if plan.cuda_pids else None
    ckpt = checkpointer.for_plan(plan, cuda)     # CRIU for a process, the engine for a container
    cuda_facts = None
    stopped = False
    sdk = agent_steps.DumpAgents(target)         # SDK agents: weights out of the image
    work = workdir.make(repo.path, "dump-")
    images = os.path.join(work, "images")
    logs = os.path.join(work, "logs")
    try:
        os.makedirs(images)
        os.makedirs(logs)
        sdk.prepare(stages)                      # SDK: before the CUDA lock; failure -> transparent
        with repo.shared_lock():
            if cuda:
                cuda_facts = cuda.describe()
                with stages.stage("cuda_lock"):
                    cuda.lock_all(req.lock_timeout_ms)
                with stages.stage("cuda_checkpoint"):
                    cuda.checkpoint_all()
            with stages.stage(ckpt.stage):
                ckpt.dump(images, logs, req.leave_running)
            stopped = not req.leave_running
            if req.leave_running and cuda:
                with stages.stage("cuda_restore"):
                    cuda.restore_all(None)
                with stages.stage("cuda_unlock"):
                    cuda.unlock_all()
            if req.leave_running:
                sdk.resume(stages)               # SDK: the original reads its weights back
            # Drop all-zero private anonymous pages from the images (imagefile/zero_pages.py).
            with stages.stage("zero_elide"):
                zero_stats = None if os.environ.get("GPUSNAP_NO_ZERO_ELIDE") else zero_pages.elide(ckpt.criu_dir(images))
            with stages.stage("ingest"):
                files, counts = repo.ingest_dir(images, progress)
                log_files, log_counts = repo.ingest_dir(logs)
            manifest = {
                "id": repo.new_snapshot_id(), "name": req.name, "target": target.to_dict(),
                "pids": target.pids, "criu_version": plan.criu_version,
                "criu": {"shell_job": plan.criu_options.shell_job},
                "kernel": platform.release(), "host": socket.gethostname(),
                "gpusnap_version": VERSION, "files": files, "logs": log_files,
                "bytes_logical": counts["bytes_logical"],
                "bytes_stored": counts["bytes_stored"] + log_counts["bytes_stored"],
                "bytes_new": counts["bytes_new"] + log_counts["bytes_new"],
                "cuda": cuda_facts, "leave_running": req.leave_running,
                "zero_pages_dropped": zero_stats.pages_dropped if zero_stats else None,
                "sdk": sdk.record(), "notes": sdk.notes,
            }
            with stages.stage("commit"):
                manifest["timings"] = stages.to_dict()
                repo.commit(manifest)
        if stopped:
            ckpt.finish()
            stopped = False
        manifest["timings"] = stages.to_dict()
        return manifest
    except BaseException as exc:
        sdk_errors: list[str] = []
        with checkpointer.unwinding():
            _undo(ckpt, cuda, stopped)
            sdk_errors = sdk.undo()              # SDK: after CUDA runs again; never raises
        if isinstance(exc, GpusnapError):
            if exc.hint and work in exc.hint:
                exc.hint = None                 # it names a file in the work dir, removed below
            if not isinstance(exc, Interrupted) and os.path.exists(os.path.join(logs, "dump.log")):
                kept = workdir.keep_log(repo.path, os.path.join(logs, "dump.log"), "dump")
                exc.hint = exc.hint or (f"CRIU log kept at {kept}" if kept else None)
            if ckpt.undo_errors or sdk_errors:
                exc.hint = "; ".join(filter(None, [exc.hint, *ckpt.undo_errors, *sdk_errors]))
        raise
    finally:
        with checkpointer.unwinding():
            workdir.remove(work)


def _undo(ckpt, cuda, stopped: bool) -> None:
    """Bring the target back to where it started: resumed, CUDA restored and unlocked."""
    if stopped:
        ckpt.resume(cuda)
    if cuda:
        cuda.rollback()
