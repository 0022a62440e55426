"""Dump: resolve the target, CUDA lock + checkpoint, take the images, ingest, commit.

Order and undo (every step that changes the target has its undo, run on any failure,
Ctrl-C and SIGTERM included):

    cuda lock            <- unlock
    cuda checkpoint      <- cuda restore
    (a new CUDA process in the target: undo, once more from the lock: cudarace.py)
    take the images      <- resume the original (the Dumper of the target's kind)
    ingest, commit       (the store: nothing visible until the manifest is written)
    then: kill the target, or (--leave-running) resume it

With --leave-running and the page stream, the original's CUDA is restored and unlocked on a
thread of its own while the stream's slots still queued and the other images are stored (the
driver's restore and the store's finish share nothing; the stream grows into host memory
the checkpoint left, so CRIU does not wait for the disk: store/pagestream.py); the commit
waits for it, so that the manifest's downtime is the real one and a failed restore still
commits nothing.

Without --leave-running the original is left stopped rather than killed, so a dump that
fails after the images are taken (disk full, say) still resumes it: the target dies only
once its snapshot is committed.

Taking the images is the strategy of the target's kind (engine/strategies): gpusnap's
CRIU for a process tree; for a container, its engine's checkpoint (docker, podman),
whose undo starts the container again from the images just taken.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import shutil
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from .. import VERSION, hostmem, interrupts, testpause
from ..criu import pageserver
from ..cuda import hugepages, staging
from ..criu.runner import log_errors
from ..criu.locate import find_criu
from ..errors import ContainerEngineError, CriuFailed, GpusnapError, Interrupted, UsageError
from ..imagefile import zero_pages
from ..model import CriuFacts, Manifest
from ..store import Repository
from ..store import seed as seeds
from ..store.pagestream import PageStream
from . import agent_steps, cudarace, gpu, intent, seeding, strategies, workdir
from .plans import DumpPlan, DumpRequest
from .timing import Stages

__all__ = ["DumpPlan", "DumpRequest", "execute", "plan"]


def plan(req: DumpRequest) -> DumpPlan:
    """Every check that can fail, before the target is touched."""
    if (req.pid is None) == (req.container is None):
        raise UsageError("name a container or give --pid, not both")
    criu_path, criu_version = find_criu()
    strategy, target = strategies.resolve(req)
    collective_pids = [] if req.force else \
        gpu.refuse_nccl_ipc(target.pids, "dump", strategy.sdk_agents)
    notes = strategy.preflight(req, target)
    seed_files = seeds.weight_files([p for p in req.seed if p != SEED_AUTO])
    for path in seed_files:             # every header read now: a bad file refused here
        seeds.tensor_ranges(path)
    seed_sources = seeds.sources_of(seed_files)
    found, skipped = seeding.discover(target.pids) if SEED_AUTO in req.seed else (None, [])
    if found is not None:
        seed_files += found.paths
        seed_sources += found.sources
    return DumpPlan(request=req, target=target, strategy=strategy, criu_path=criu_path,
                    collective_pids=collective_pids, seed_files=seed_files,
                    seed_sources=seed_sources, seed_found=found, seed_skipped=skipped,
                    criu_version=criu_version, cuda_pids=gpu.cuda_pids(target.pids),
                    criu_options=strategy.criu_options(target),
                    zero_elide=not os.environ.get("GPUSNAP_NO_ZERO_ELIDE"), notes=notes,
                    pages=_page_path(req.pages, strategy.kind))


SEED_AUTO = "auto"


def _seed_report(plan: DumpPlan, seed: seeding.InlineSeed | None) -> dict | None:
    """What --seed stored, for --json's `seed`; with auto, also what was found and left
    out ("auto": true, "skipped": the sources whose header is no safetensors header), an
    empty report where nothing was found."""
    got = seed.report if seed else None
    if SEED_AUTO not in plan.request.seed:
        return got
    got = got or {"id": None, "reused": False, "bytes_seeded": 0, "bytes_new": 0,
                  "seconds": 0.0, "sources": []}
    return {**got, "auto": True, "skipped": list(plan.seed_skipped)}


PAGE_PATHS = ("auto", "stream", "staged")


def _page_path(asked: str, kind: str) -> str:
    """stream: CRIU sends the pages to gpusnap, which stores them as they come (process
    trees); staged: CRIU writes pages images into the work dir, ingested afterwards
    (containers: their engine runs CRIU)."""
    if asked not in PAGE_PATHS:
        raise UsageError(f"--pages must be one of {', '.join(PAGE_PATHS)}")
    if asked == "stream" and kind != "process":
        raise UsageError("--pages stream is for process trees (a container's engine writes "
                         "its pages images itself)")
    if asked == "auto":
        return "stream" if kind == "process" else "staged"
    return asked


def execute(plan: DumpPlan, repo: Repository,
            progress: Callable[[int], None] | None = None, report: dict | None = None) -> Manifest:
    """Run the dump; returns the committed manifest. report, where given, gets "seed": what
    --seed stored (engine/seeding.py), or None."""
    try:
        run = _Dump(plan, repo)
    except BaseException:
        plan.close_seed()
        raise
    try:
        run.start()
        with repo.shared_lock():
            manifest = run.take_and_commit(progress)
        manifest.downtime = run.downtime()          # without --leave-running: to the commit's end
        run.finish()
        manifest.timings = run.stages.to_dict()     # now with the commit's
        if report is not None:
            report["seed"] = _seed_report(plan, run.seed)
        return manifest
    except BaseException as exc:
        if run.committed():
            run.after_commit(exc)           # raises: says the snapshot exists
        run.undo(exc)
        raise
    finally:
        with interrupts.shielded():
            if run.seed:
                run.seed.stop()
            plan.close_seed()
            workdir.remove(run.work)
            run.intent.end()


class _Dump:
    """One dump's state: what its undo needs to know (is CUDA locked, is the original
    stopped, did SDK agents drop their weights)."""

    def __init__(self, plan: DumpPlan, repo: Repository):
        self.plan, self.repo, self.stages = plan, repo, Stages()
        self.cuda = gpu.session(plan.cuda_pids) if plan.cuda_pids else None
        self.dumper = plan.strategy.dumper(plan, self.cuda)
        # SDK agents: weights out of the image
        self.sdk = agent_steps.DumpAgents(plan.target, ask=plan.strategy.sdk_agents,
                                          required=plan.collective_pids)
        self.stopped = False
        self.stream: PageStream | None = None
        self.held_since: float | None = None     # downtime: from the CUDA lock or CRIU's freeze
        self.resumed_at: float | None = None
        self.resuming: tuple[Future, Stages] | None = None     # --leave-running: on its thread
        self.snapshot: str | None = None
        self.seed: seeding.InlineSeed | None = None
        self.intent = intent.NONE
        self.work = workdir.make(repo.path, "dump-")
        self.images = os.path.join(self.work, "images")
        self.logs = os.path.join(self.work, "logs")

    def start(self) -> None:
        # the guard resumes or finishes the target if gpusnap dies (engine/intent.py); kept
        # before a signal is raised, so that execute() ends the record and its guard
        with interrupts.held():
            self.intent = intent.for_dump(self.plan, self.repo.url, self.work, self.dumper,
                                          self.cuda)
        self.stages.listener = self.intent.stage
        os.makedirs(self.images)
        os.makedirs(self.logs)
        self.sdk.prepare(self.stages)       # SDK: before the CUDA lock; failure -> transparent

    def take_and_commit(self, progress) -> Manifest:
        req, stages = self.plan.request, self.stages
        if self.plan.seed_files:            # under the store's lock, before the CUDA lock
            with stages.stage("seed_start"):
                self.seed = seeding.InlineSeed(self.repo, self.plan.seed_files,
                                               self.plan.seed_sources)
        cuda_facts = self._hold_and_take(req, progress)
        if req.leave_running:
            self._start_resuming(background=self.stream is not None)
        if self.stream:
            files, counts, zero_stats = self._ingest_streamed(progress)
        else:
            files, counts, zero_stats = self._ingest_staged(progress)
        with stages.stage("ingest_logs"):
            log_files, log_counts = self.repo.ingest_dir(self.logs)
        manifest = self._manifest(files, counts, log_files, log_counts, cuda_facts, zero_stats)
        if self.resuming:                   # while the original's CUDA is restored
            with stages.stage("commit_sync"):
                self.repo.sync_ahead(manifest)
        if self.seed:
            with stages.stage("seed_wait"):
                self.seed.wait()            # a seed that failed is said, the dump goes on
        self._resumed()                     # raises what the original's resume raised
        self.snapshot = manifest.id
        self.intent.update(snapshot=manifest.id)
        with stages.stage("commit"):
            manifest.timings = stages.to_dict()
            manifest.downtime = self.downtime()
            self.repo.commit(manifest)
        self.intent.update(stage="committed")
        return manifest

    def _drop_stream(self) -> None:
        """A streamed attempt that will not be committed: its workers stop."""
        if self.stream:
            self.stream.abort()
            self.stream = None

    def _serve(self, progress):
        """CRIU's page stream into self.stream (criu/pageserver.py)."""
        progress = _pause_after_first(progress, "pages_stream")
        return lambda sock, alive: pageserver.serve(sock, self.stream, progress, alive)

    def _ingest_streamed(self, progress):
        """The streamed pages are stored: the pagemaps are written (zero runs of private
        anonymous memory dropped), then the other images are ingested."""
        with self.stages.stage("pages_finish"):
            pages, counts, zero_stats = self.stream.finish(self.dumper.criu_dir(self.images),
                                                          elide=self.plan.zero_elide)
            self.stages.seconds.update(self.stream.timings())   # where the stream's time went
            self.stream = None
        with self.stages.stage("ingest"):
            files, more = self.repo.ingest_dir(self.images, progress)
        for key in counts:
            counts[key] += more[key]
        return sorted(files + pages, key=lambda f: f.path), counts, zero_stats

    def _ingest_staged(self, progress):
        """CRIU wrote pages images into the work dir: all-zero private anonymous pages are
        dropped from them (imagefile/zero_pages.py), then everything is ingested."""
        with self.stages.stage("zero_elide"):
            zero_stats = zero_pages.elide(self.dumper.criu_dir(self.images)) \
                if self.plan.zero_elide else None
        with self.stages.stage("ingest"):
            files, counts = self.repo.ingest_dir(self.images, progress)
        return files, counts, zero_stats

    def _hold_and_take(self, req, progress=None):
        """CUDA lock + checkpoint, then the images. A process of the target that starts
        using the GPU meanwhile undoes both, and the dump starts once more from the lock
        (engine/cudarace.py); a second race raises GpuRace. Returns the CUDA facts."""
        kind = self.plan.target.kind
        try:
            return self._attempt(req, progress)
        except cudarace.Started as started:
            with interrupts.shielded():
                self._drop_stream()
                undone = not (self.cuda and self.cuda.rollback())
            if not undone:
                raise cudarace.race_error(started.pid, kind) from None
        shutil.rmtree(self.images)              # what the first attempt wrote
        os.makedirs(self.images)
        pids = gpu.cuda_pids(self.dumper.pids_now())
        self.cuda = gpu.session(pids) if pids else None
        self.dumper = self.plan.strategy.dumper(self.plan, self.cuda)
        if self.cuda:       # the guard's record: every CUDA pid of this attempt
            self.intent.update(cuda={str(p): s.name for p, s in self.cuda.initial.items()})
        try:
            return self._attempt(req, progress)
        except cudarace.Started as started:
            raise cudarace.race_error(started.pid, kind) from None

    def _attempt(self, req, progress=None):
        stages, cuda = self.stages, self.cuda
        if self.plan.pages == "stream":
            with stages.stage("page_workers"):          # its workers fork before anything is locked
                self.stream = PageStream(self.repo, room=_available() if req.leave_running else 0)
        cuda_facts = None
        if cuda:
            with stages.stage("cuda_facts"):            # NVML: before the checkpoint frees the GPUs
                cuda_facts = cuda.describe()
        self.held_since = self.held_since or time.monotonic()   # downtime starts
        if cuda:
            mapped = staging.snapshot(cuda.pids)       # /proc/PID/maps: ~1 ms a pid
            with stages.stage("cuda_lock"):
                cuda.lock_all(req.lock_timeout_ms)
            ahead = self.stream.prefault(sum(cuda_facts.used_memory.values()), _available()) \
                if self.stream and req.leave_running and cuda_facts else None
            try:
                with stages.stage("cuda_checkpoint"):
                    cuda.checkpoint_all()
            finally:
                if ahead is not None:
                    stages.seconds.update(ahead.stop())
            if cuda_facts is not None:                  # where the device memory went
                cuda_facts.staging = staging.gained(mapped)
        if self.stream and req.leave_running:
            # the original runs again once CRIU is done: let CRIU run ahead of the disk
            # into memory the driver's checkpoint left (pagestream.py)
            self.stream.grow(_available())
        known = cuda.pids if cuda else []
        with stages.stage("cuda_recheck"):
            cudarace.check(self.dumper.pids_now(), known, gpu.cuda_pids)
        # From here the original may be stopped: an interrupt anywhere after CRIU left it
        # stopped (its log moved, the stage recorded, on the way out) must resume it, so
        # the flag is set before, not after; dumper.resume() is a no-op on a running tree.
        self.stopped = not req.leave_running
        try:
            with stages.stage(self.dumper.stage):
                self.dumper.dump(self.images, self.logs, req.leave_running,
                                 pages=self._serve(progress) if self.stream else None)
        except (CriuFailed, ContainerEngineError) as exc:
            started = cudarace.after_criu(log_errors(os.path.join(self.logs, "dump.log")),
                                          self.dumper.pids_now(), known, gpu.cuda_pids)
            if started:
                raise started from exc
            raise
        return cuda_facts

    def downtime(self) -> float | None:
        """Seconds the target was held (CUDA-locked or frozen): until it ran again
        (--leave-running), else until now."""
        if self.held_since is None:
            return None
        return round((self.resumed_at or time.monotonic()) - self.held_since, 4)

    def _start_resuming(self, background: bool) -> None:
        """--leave-running: the original runs again (_resume_original). background (the
        streamed path, whose last steps are light): on a thread of its own while the
        caller stores the rest, and _resumed() waits for it; its stages are timed apart
        (the intent record's stage stays the caller's) and added by _resumed(). A staged
        ingest hashes gigabytes in forked workers, which no running thread may share a
        fork with (store/parallel.py): there it runs first, as before."""
        if not background:
            self._resume_original(self.stages)
            return
        stages = Stages()
        pool = ThreadPoolExecutor(1, "gpusnap-resume")
        try:
            self.resuming = (pool.submit(self._resume_original, stages), stages)
        finally:
            pool.shutdown(wait=False)

    def _resumed(self, quiet: bool = False) -> None:
        """Wait for _start_resuming's thread, if one runs; its failure is raised (quiet:
        dropped, as undo() then restores what it left)."""
        if self.resuming is None:
            return
        future, stages = self.resuming
        try:
            with interrupts.shielded() if quiet else contextlib.nullcontext():
                future.result()
        except Exception:   # noqa: BLE001 - quiet: rollback() sees the states it left
            if not quiet:
                raise
        finally:
            if future.done():
                self.resuming = None
                self.stages.seconds.update(stages.seconds)

    def _resume_original(self, stages: Stages) -> None:
        """--leave-running: CUDA and the SDK agents run again once the images are taken."""
        if self.cuda:
            with stages.stage("cuda_restore"):
                self.cuda.restore_all(None)
            with stages.stage("cuda_unlock"):
                self.cuda.unlock_all()
        self.sdk.resume(stages)             # SDK: the original reads its weights back
        self.resumed_at = time.monotonic()

    def _manifest(self, files, counts, log_files, log_counts, cuda_facts, zero_stats) -> Manifest:
        plan, req, target = self.plan, self.plan.request, self.plan.target
        return Manifest(
            id=self.repo.new_snapshot_id(), name=req.name, target=copy.deepcopy(target),
            pids=target.pids, criu_version=plan.criu_version,
            criu=CriuFacts(shell_job=plan.criu_options.shell_job,
                           stopped=sorted(self.dumper.stopped_for_criu)),
            kernel=platform.release(), host=socket.gethostname(),
            gpusnap_version=VERSION, files=files, logs=log_files,
            bytes_logical=counts["bytes_logical"],
            bytes_stored=counts["bytes_stored"] + log_counts["bytes_stored"],
            bytes_new=counts["bytes_new"] + log_counts["bytes_new"],
            cuda=cuda_facts, leave_running=req.leave_running,
            zero_pages_dropped=zero_stats.pages_dropped if zero_stats else None,
            sdk=self.sdk.record(),
            notes=[*plan.notes, *self.sdk.notes, *hugepages.notes(self.cuda)])

    def finish(self) -> None:
        """The snapshot is committed: the original goes (unless --leave-running)."""
        if self.stopped:
            self.dumper.finish()
            self.stopped = False

    def committed(self) -> bool:
        """The manifest is in the store (what failed or interrupted came after the
        commit point: a signal during the directory fsync, say)."""
        if not self.snapshot:
            return False
        with interrupts.shielded():
            try:
                return self.repo.backend.exists(f"snapshots/{self.snapshot}.json")
            except Exception:  # noqa: BLE001 - unknown: undo, the original runs on
                return False

    def after_commit(self, exc: BaseException) -> None:
        """The original ends as documented, and the error says the snapshot exists."""
        with interrupts.shielded():
            self.finish()
        ending = "the original keeps running" if self.plan.request.leave_running \
            else "the original was killed, as after every dump"
        told = f"snapshot {self.snapshot} was committed before the {_what(exc)}; {ending}"
        if isinstance(exc, (KeyboardInterrupt, Interrupted)):
            raise Interrupted(f"interrupted after the commit: {told}") from exc
        if isinstance(exc, GpusnapError):
            exc.hint = "; ".join(filter(None, [exc.hint, told]))
        raise exc

    def undo(self, exc: BaseException) -> None:
        """Bring the target back to where it started (resumed, CUDA restored and
        unlocked, SDK weights read back) and say in exc's hint what could not be."""
        sdk_errors: list[str] = []
        self._resumed(quiet=True)           # a resume under way ends first
        with interrupts.shielded():
            self._drop_stream()
            if self.seed:
                self.seed.stop()
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


def _available() -> int:
    """Memory this process may take now (bytes; its cgroup's limit included): what a
    --leave-running page stream may grow into."""
    return hostmem.available()


def _what(exc: BaseException) -> str:
    return "interrupt" if isinstance(exc, (KeyboardInterrupt, Interrupted)) else "error"


def _pause_after_first(progress, point: str):
    """progress, unless GPUSNAP_TEST_PAUSE names point (testpause.py): then it also waits
    there the first time it is called (a fault test's signal lands mid-stream)."""
    if not testpause.wanted(point):
        return progress
    first = [True]

    def step(n: int) -> None:
        if progress:
            progress(n)
        if first:
            first.clear()
            testpause.pause(point)
    return step
