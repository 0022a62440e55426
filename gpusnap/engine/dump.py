"""Dump: resolve the target, CUDA lock + checkpoint, take the images, ingest, commit.

Order and undo (every step that changes the target has its undo, run on any failure,
Ctrl-C and SIGTERM included):

    cuda lock            <- unlock
    cuda checkpoint      <- cuda restore
    take the images      <- resume the original (the Dumper of the target's kind)
    ingest, commit       (the store: nothing visible until the manifest is written)
    then: kill the target, or (--leave-running) resume it

Without --leave-running the original is left stopped rather than killed, so a dump that
fails after the images are taken (disk full, say) still resumes it: the target dies only
once its snapshot is committed.

Taking the images is the strategy of the target's kind (engine/strategies): gpusnap's
CRIU for a process tree; for a container, its engine's checkpoint (docker, podman),
whose undo starts the container again from the images just taken.
"""

from __future__ import annotations

import copy
import os
import platform
import socket
from typing import Callable

from .. import VERSION, interrupts
from ..criu.argv import CriuOptions
from ..criu.locate import find_criu
from ..errors import GpusnapError, Interrupted, UsageError
from ..imagefile import zero_pages
from ..model import CriuFacts, Manifest
from ..store import Repository
from . import agent_steps, gpu, strategies, workdir
from .plans import DumpPlan, DumpRequest
from .timing import Stages

__all__ = ["DumpPlan", "DumpRequest", "execute", "plan"]


def plan(req: DumpRequest) -> DumpPlan:
    """Every check that can fail, before the target is touched."""
    if (req.pid is None) == (req.container is None):
        raise UsageError("name a container or give --pid, not both")
    criu_path, criu_version = find_criu()
    strategy, target = strategies.resolve(req)
    if not req.force:
        gpu.refuse_nccl_ipc(target.pids, "dump")
    notes = strategy.preflight(req, target)
    return DumpPlan(request=req, target=target, strategy=strategy, criu_path=criu_path,
                    criu_version=criu_version, cuda_pids=gpu.cuda_pids(target.pids),
                    criu_options=CriuOptions(shell_job=target.shell_job),
                    zero_elide=not os.environ.get("GPUSNAP_NO_ZERO_ELIDE"), notes=notes)


def execute(plan: DumpPlan, repo: Repository,
            progress: Callable[[int], None] | None = None) -> Manifest:
    """Run the dump; returns the committed manifest."""
    run = _Dump(plan, repo)
    try:
        run.start()
        with repo.shared_lock():
            manifest = run.take_and_commit(progress)
        run.finish()
        manifest.timings = run.stages.to_dict()     # now with the commit's
        return manifest
    except BaseException as exc:
        run.undo(exc)
        raise
    finally:
        with interrupts.shielded():
            workdir.remove(run.work)


class _Dump:
    """One dump's state: what its undo needs to know (is CUDA locked, is the original
    stopped, did SDK agents drop their weights)."""

    def __init__(self, plan: DumpPlan, repo: Repository):
        self.plan, self.repo, self.stages = plan, repo, Stages()
        self.cuda = gpu.session(plan.cuda_pids) if plan.cuda_pids else None
        self.dumper = plan.strategy.dumper(plan, self.cuda)
        # SDK agents: weights out of the image
        self.sdk = agent_steps.DumpAgents(plan.target, ask=plan.strategy.sdk_agents)
        self.stopped = False
        self.work = workdir.make(repo.path, "dump-")
        self.images = os.path.join(self.work, "images")
        self.logs = os.path.join(self.work, "logs")

    def start(self) -> None:
        os.makedirs(self.images)
        os.makedirs(self.logs)
        self.sdk.prepare(self.stages)       # SDK: before the CUDA lock; failure -> transparent

    def take_and_commit(self, progress) -> Manifest:
        req, stages, cuda = self.plan.request, self.stages, self.cuda
        cuda_facts = None
        if cuda:
            cuda_facts = cuda.describe()
            with stages.stage("cuda_lock"):
                cuda.lock_all(req.lock_timeout_ms)
            with stages.stage("cuda_checkpoint"):
                cuda.checkpoint_all()
        with stages.stage(self.dumper.stage):
            self.dumper.dump(self.images, self.logs, req.leave_running)
        self.stopped = not req.leave_running
        if req.leave_running:
            self._resume_original()
        # Drop all-zero private anonymous pages from the images (imagefile/zero_pages.py).
        with stages.stage("zero_elide"):
            zero_stats = zero_pages.elide(self.dumper.criu_dir(self.images)) \
                if self.plan.zero_elide else None
        with stages.stage("ingest"):
            files, counts = self.repo.ingest_dir(self.images, progress)
            log_files, log_counts = self.repo.ingest_dir(self.logs)
        manifest = self._manifest(files, counts, log_files, log_counts, cuda_facts, zero_stats)
        with stages.stage("commit"):
            manifest.timings = stages.to_dict()
            self.repo.commit(manifest)
        return manifest

    def _resume_original(self) -> None:
        """--leave-running: CUDA and the SDK agents run again once the images are taken."""
        if self.cuda:
            with self.stages.stage("cuda_restore"):
                self.cuda.restore_all(None)
            with self.stages.stage("cuda_unlock"):
                self.cuda.unlock_all()
        self.sdk.resume(self.stages)        # SDK: the original reads its weights back

    def _manifest(self, files, counts, log_files, log_counts, cuda_facts, zero_stats) -> Manifest:
        plan, req, target = self.plan, self.plan.request, self.plan.target
        return Manifest(
            id=self.repo.new_snapshot_id(), name=req.name, target=copy.deepcopy(target),
            pids=target.pids, criu_version=plan.criu_version,
            criu=CriuFacts(shell_job=plan.criu_options.shell_job),
            kernel=platform.release(), host=socket.gethostname(),
            gpusnap_version=VERSION, files=files, logs=log_files,
            bytes_logical=counts["bytes_logical"],
            bytes_stored=counts["bytes_stored"] + log_counts["bytes_stored"],
            bytes_new=counts["bytes_new"] + log_counts["bytes_new"],
            cuda=cuda_facts, leave_running=req.leave_running,
            zero_pages_dropped=zero_stats.pages_dropped if zero_stats else None,
            sdk=self.sdk.record(), notes=[*plan.notes, *self.sdk.notes])

    def finish(self) -> None:
        """The snapshot is committed: the original goes (unless --leave-running)."""
        if self.stopped:
            self.dumper.finish()
            self.stopped = False

    def undo(self, exc: BaseException) -> None:
        """Bring the target back to where it started (resumed, CUDA restored and
        unlocked, SDK weights read back) and say in exc's hint what could not be."""
        sdk_errors: list[str] = []
        with interrupts.shielded():
            if self.stopped:
                self.dumper.resume()
            if self.cuda:
                self.cuda.rollback()
            sdk_errors = self.sdk.undo()    # SDK: after CUDA runs again; never raises
        if isinstance(exc, GpusnapError):
            self._explain(exc, [*self.dumper.undo_errors, *sdk_errors])

    def _explain(self, exc: GpusnapError, undo_errors: list[str]) -> None:
        logs, work = self.logs, self.work
        if exc.hint and work in exc.hint:
            exc.hint = None                 # it names a file in the work dir, removed below
        if not isinstance(exc, Interrupted) and os.path.exists(os.path.join(logs, "dump.log")):
            kept = workdir.keep_log(self.repo.path, os.path.join(logs, "dump.log"), "dump")
            exc.hint = exc.hint or (f"CRIU log kept at {kept}" if kept else None)
        if undo_errors:
            exc.hint = "; ".join(filter(None, [exc.hint, *undo_errors]))
