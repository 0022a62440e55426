"""A process tree, named by its root pid: gpusnap's own CRIU dumps and restores it.

Dump: CRIU leaves the tree stopped (not killed) until the snapshot is committed; the
undo is SIGCONT, to the processes that were not stopped already before the dump (a tree
someone SIGSTOP'd stays stopped, as it was found).

Dump refuses a tree that shares a pipe, socket or terminal with a process outside it
(targets/fds.py): CRIU would restore the tree's end alone. --force dumps it anyway, with
a note in the manifest of each such descriptor and what a restore makes of it.

Restore: materialise images -> CRIU restore -> CUDA restore + unlock -> SDK resume, then
the tree must still run after a settle window (engine/alive.py). The snapshot is only
read: a failed restore leaves it as it was. A tree that CRIU restored but whose CUDA
restore failed, or that died right after, is killed, not left half alive.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from typing import Callable

import psutil

from ... import interrupts
from ...criu import netlock, timewait
from ...criu import runner as criu_runner
from ...criu.argv import CriuOptions
from ...errors import (CriuFailed, CudaFailed, ImageError, OutsideDescriptors, PidInUse, RestoredTreeDied,
                       TargetNotFound, UsageError)
from ...imagefile import inetsk
from ...model import Manifest, Target
from ...store import Repository
from ...targets import ghosts
from ...targets.process import (GONE, kill_and_wait, kill_for_good, restored_tree, send, taken,
                                tree_pids, tree_rss)
from .. import agent_steps, alive, gpu, imagecache, intent, pagepath, parked, workdir
from ..plans import DumpPlan, DumpRequest, RestorePlan, RestoreRequest
from ..timing import Stages


class ProcessStrategy:
    kind = "process"
    sdk_agents = True

    def preflight(self, req: DumpRequest, target: Target) -> list[str]:
        if req.ignore_rootfs:
            raise UsageError("--ignore-rootfs is for containers: a process snapshot holds "
                             "no filesystem")
        return outside_fds(target.pids, req.force)

    def criu_options(self, target: Target) -> CriuOptions:
        """A host without iptables: CRIU's network lock as criu/netlock.py chooses it.
        Deleted files the tree holds (NCCL's shared memory): a ghost limit that stores them."""
        return CriuOptions(shell_job=target.shell_job, network_lock=netlock.for_dump(target.pids),
                           ghost_limit=ghosts.ghost_limit(ghosts.scan(target.pids)))

    def dumper(self, plan: DumpPlan, cuda=None) -> ProcessDump:
        return ProcessDump(plan)

    def plan_restore(self, req: RestoreRequest, manifest: Manifest, criu_path: str) -> RestorePlan:
        if req.name or req.devices:
            raise UsageError("--name and --device are for container snapshots")
        busy = taken(manifest.pids)
        if busy:
            raise PidInUse(f"pids {busy} are in use: the original process is probably still running",
                           hint="stop the original first (a zombie's parent must reap it), "
                                "or restore on another host")
        agent_steps.check_weights(manifest)         # SDK: weight files unchanged, or refuse
        plan = RestorePlan(request=req, manifest=manifest, strategy=self, criu_path=criu_path,
                           criu_options=CriuOptions(shell_job=manifest.criu.shell_job,
                                                    network_lock=netlock.for_restore()))
        if req.standby:
            _check_standby(req, manifest)
            parked.state_dir()                      # usable, or refused now
        elif manifest.cuda:
            move = gpu.plan_remap(manifest.cuda, req.gpus)
            plan.gpu_pairs, plan.notes = move.pairs, move.notes
        plan.page_path, notes = pagepath.choose(req.pages, self.kind)
        plan.notes += notes
        return plan

    def restore(self, plan: RestorePlan, repo: Repository,
                progress: Callable[[int], None] | None = None) -> dict:
        """pages in (CRIU's or gpusnap's page path) -> CUDA restore + unlock -> SDK resume."""
        m = plan.manifest
        work = workdir.make(repo.path, "restore-")
        stages = Stages()
        pages = pagepath.UffdPages() if plan.page_path == "uffd" else None
        root_pid, guard = None, intent.NONE
        try:
            # gpusnap killed: the tree goes too; the record and its guard are kept before
            # a signal is raised, so that the clean-up below ends them
            with interrupts.held():
                guard = intent.for_restore(m.id, m.pids, work)
            stages.listener = guard.stage
            with contextlib.ExitStack() as reading:
                root_pid, cuinit = _pages_in(plan, repo, work, stages, progress, pages, reading)
                _continue_stopped(root_pid, m)      # before CUDA's restore, which waits for them
                if not (pages and pages.pending):
                    reading.close()                 # else: once the late fill is in
                guard.update(root=root_pid, root_started=intent.started(root_pid) or 0.0)
                alive.check_tree(root_pid, m.pids, "once CRIU restored it", m.notes)
                running = time.monotonic()          # CUDA's threads wait for the unlock
                sdk = standby = None
                if not plan.request.standby:
                    _restore_cuda(plan, cuinit, stages, pages)
                if pages:
                    pages.finish_late(stages)       # every page in, before the tree is ours
            if plan.request.standby:                # CUDA and the SDK wait for `gpusnap resume`
                alive.settle_and_check(root_pid, m.pids, stages, m.notes, running)
                standby = _record_standby(plan, root_pid, stages)
            else:
                running = time.monotonic() if m.cuda else running
                sdk = agent_steps.resume(m, stages) # SDK: the server reads its weights back
                alive.settle_and_check(root_pid, m.pids, stages, m.notes, running)
            if pages:
                pages.done()
            return {"pid": root_pid, "snapshot": m.id, "timings": stages.to_dict(),
                    "notes": plan.notes, "sdk": sdk, "materialise": repo.last_materialise,
                    "page_path": plan.page_path, "fill": pages.fill.to_dict() if pages else None,
                    "standby": standby}
        except BaseException as exc:
            _undo_restore(repo, work, root_pid, m.pids, exc)
            if pages:
                with interrupts.shielded():     # the lazy-pages guard goes, reaped
                    pages.abort()
            raise
        finally:
            with interrupts.shielded():         # a second Ctrl-C must not cut the clean-up short
                workdir.remove(work)
                guard.end()


def _pages_in(plan: RestorePlan, repo: Repository, work: str, stages: Stages, progress,
              pages: pagepath.UffdPages | None, reading: contextlib.ExitStack):
    """CRIU restores the tree and its pages come in (all, or all but the late ranges:
    pagepath.py), under the store's shared lock, which reading holds. (root, cuInit)."""
    m = plan.manifest
    # rm and gc (which drop caches) wait for CRIU and the fill; a remote store's packs
    # come ahead of the reads, several at once
    held = contextlib.ExitStack()
    reading.enter_context(_released_as(stages, "store_release", held))
    with stages.stage("store_lock"):
        held.enter_context(repo.shared_lock())
        ahead = held.enter_context(repo.prefetch(m, _small_images(m)))
    if ahead:
        plan.notes.append(f"{ahead.packs} packs ({ahead.bytes / 1e9:.2f} GB) "
                          f"fetched ahead from the store while restoring")
    agent_steps.prepare_socket_dirs(m)      # SDK: CRIU re-binds the agent's socket there
    if not pages:
        return _criu_pages(plan, repo, work, stages, progress)
    reading.callback(pages.stop_filling)    # on a failure: before the unlock
    prep = _prepared(plan, repo, work, stages, progress)
    _make_room(plan, prep.images, stages)
    return pages.restore(plan, repo, work, prep, stages, progress)


@contextlib.contextmanager
def _released_as(stages: Stages, name: str, held: contextlib.ExitStack):
    """held's exits (the store's lock, the prefetch: an s3 store's requests and helper
    processes) timed as stage name."""
    try:
        yield
    finally:
        with stages.stage(name):
            held.close()


def _continue_stopped(root: int, m: Manifest) -> None:
    """SIGCONT to the restored tasks that gpusnap stopped before CRIU dumped them (no
    network lock: criu/netlock.py), and to those only: pids of the restored tree, not
    any pid a manifest names."""
    if not m.criu.stopped:
        return
    try:
        ours = set(tree_pids(root))
    except GONE:
        return                              # gone: alive.check_tree says so
    send([p for p in m.criu.stopped if p in ours], signal.SIGCONT)


def _small_images(m: Manifest) -> list[str]:
    """The images other than the pages: read first, by planning and by CRIU."""
    return [f.path for f in m.files if not os.path.basename(f.path).startswith("pages-")]


_OUTSIDE_HINT = ("start it with its stdio on files or /dev/null (`</dev/null >LOG 2>&1`) "
                 "in its own session (setsid, nohup), or dump --force to take it as it is "
                 "(the snapshot notes what a restore makes of each; a restore the tree does "
                 "not survive fails with exit 11)")


def outside_fds(pids: list[int], force: bool) -> list[str]:
    """OutsideDescriptors for the tree's descriptors that lead outside it; with force,
    a note of each instead."""
    from ...targets import fds
    found = fds.scan(pids)
    if found and not force:
        shown = "; ".join(f.describe() for f in found[:3])
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise OutsideDescriptors(f"{shown}{more}: a restore brings back the tree's end "
                                 f"alone", hint=_OUTSIDE_HINT)
    return [f"--force: {f.describe()}; restored, it is {f.restored()}" for f in found]


def _criu_pages(plan: RestorePlan, repo: Repository, work: str, stages: Stages, progress):
    """CRIU's page path: every image materialised, CRIU writes the pages. (root, cuInit)."""
    images = _images(plan, repo, work, stages, progress)
    _make_room(plan, images, stages)
    # cuInit's thread once CRIU is forked (and materialise's workers before it): a fork
    # while another thread runs in libcuda could leave the child stuck before its exec
    cuinit: list = []
    with stages.stage("criu_restore"):
        root = criu_runner.restore(images, plan.criu_options, work_dir=work, criu=plan.criu_path,
                                   started=lambda: plan.manifest.cuda and
                                   cuinit.append(gpu.init_in_background()))
    return root, (cuinit[0] if cuinit else None)


def _make_room(plan: RestorePlan, images: str, stages: Stages) -> None:
    """The ports CRIU binds again (listeners), freed of the TIME_WAIT connections a tree
    dumped moments ago on this host left on them (criu/timewait.py)."""
    try:
        with open(os.path.join(images, "files.img"), "rb") as f:
            ports = {s.port for s in inetsk.bound_tcp(f)}
    except FileNotFoundError:
        return
    except ValueError as exc:
        raise ImageError(f"files.img: {exc}") from None
    if ports:
        with stages.stage("ports"):
            note = timewait.make_room(ports)
        if note:
            plan.notes.append(note)


def _images(plan: RestorePlan, repo: Repository, work: str, stages: Stages, progress) -> str:
    """The snapshot's CRIU images, verified: the warm cache's, else materialised in work."""
    cached = imagecache.lookup(repo.path, plan.manifest)
    if cached:                                  # warm: `gpusnap warm` verified these already
        repo.last_materialise = None
        plan.notes.append(f"images from the warm cache {os.path.dirname(cached)}")
        return cached
    images = os.path.join(work, "images")
    with stages.stage("materialise"):
        repo.materialise(plan.manifest, images, progress)
    return images


def _prepared(plan: RestorePlan, repo: Repository, work: str, stages: Stages,
              progress) -> pagepath.Prepared:
    """What the uffd path needs before CRIU starts: the warm cache's, else prepared in work."""
    with stages.stage("warm_cache"):
        cached = imagecache.lookup_prepared(repo.path, plan.manifest)
    if cached:                                  # warm: `gpusnap warm` verified and planned these
        repo.last_materialise = None
        plan.notes.append(f"images from the warm cache {os.path.dirname(cached.images)}")
        return cached
    with stages.stage("materialise"):
        return pagepath.prepare(repo, plan.manifest, os.path.join(work, "images"), progress)


def _check_standby(req: RestoreRequest, manifest: Manifest) -> None:
    """A standby is a restore whose CUDA state stays checkpointed: refused where there is
    none (it would be an ordinary restore), and --gpu belongs to the resume."""
    if not (manifest.cuda and manifest.cuda.pids):
        raise UsageError(f"snapshot {manifest.id[:12]} has no CUDA state: a standby of it "
                         f"would just run", hint="restore it without --standby")
    if req.gpus:
        raise UsageError("a standby holds no GPU: give --gpu to `gpusnap resume`")


def _record_standby(plan: RestorePlan, root_pid: int, stages: Stages) -> dict:
    """The restored tree, parked: `gpusnap resume PID` restores its CUDA state and unlocks
    it. Returns {host_memory}: what the standby holds in host memory (RSS of the tree)."""
    m = plan.manifest
    pids = restored_tree(root_pid, m.pids)
    with stages.stage("record"):
        parked.record({"pid": root_pid, "pids": pids, "state": "standby", "kind": "process",
                       "name": m.name or m.target.name, "container": None,
                       "cuda_pids": list(m.cuda.pids), "cuda": m.cuda.to_json(),
                       "sdk": m.sdk.to_json() if m.sdk else None,
                       "snapshot": m.id, "since": time.time()})
    return {"host_memory": tree_rss(pids), "cuda_pids": list(m.cuda.pids)}


def _restore_cuda(plan: RestorePlan, cuinit: threading.Thread | None, stages: Stages,
                  pages: pagepath.UffdPages | None = None) -> None:
    """CUDA restore + unlock. pages with late ranges pending: the driver's restore reads
    its staging memory while the fill places it; all of it is in before the unlock. A
    driver that refuses to restore from memory still being filled gets it whole, once."""
    cuda_pids = list(plan.manifest.cuda.pids) if plan.manifest.cuda else []
    if not cuda_pids:
        return
    with stages.stage("cuda_init_wait"):        # what of cuInit did not overlap CRIU
        cuinit.join()
    with stages.stage("cuda_state"):            # each pid's state, as the driver says
        cuda = gpu.session(cuda_pids)
    with stages.stage("cuda_restore"):
        try:
            cuda.restore_all(plan.gpu_pairs)
        except CudaFailed as exc:
            if not (pages and pages.pending):
                raise
            pages.finish_late(stages)
            plan.notes.append(f"CUDA restore during the fill failed ({exc.message}); "
                              f"restored again once every page was in")
            cuda.restore_all(plan.gpu_pairs)    # the pids still checkpointed (session.py)
    if pages:
        pages.finish_late(stages)
    with stages.stage("cuda_unlock"):
        cuda.unlock_all()


def _undo_restore(repo: Repository, work: str, root_pid: int | None, recorded: list[int],
                  exc: BaseException) -> None:
    """Kill the tree CRIU made (not whoever took those pids since); keep CRIU's log.
    A tree that died after CRIU restored all of it: every recorded pid is CRIU's, and
    the children of a dead root are no longer its descendants."""
    with interrupts.shielded():                 # a second Ctrl-C must not cut the undo short
        restored = root_pid if root_pid is not None else criu_runner.restored_pid(work)
        if restored is not None:
            pids = restored_tree(restored, recorded)
            if isinstance(exc, RestoredTreeDied):
                pids = sorted(set(pids) | set(recorded))
            kill_and_wait(pids)
    if isinstance(exc, CriuFailed) and os.path.exists(os.path.join(work, "restore.log")):
        kept = workdir.keep_log(repo.path, os.path.join(work, "restore.log"), "restore")
        said = [exc.hint] if isinstance(exc, RestoredTreeDied) else []
        exc.hint = "; ".join(filter(None, [*said, kept and f"CRIU log kept at {kept}"])) or None


class ProcessDump:
    """gpusnap's CRIU dumps the tree and leaves it stopped until the snapshot is committed."""
    stage = "criu_dump"

    def __init__(self, plan: DumpPlan):
        self.target = plan.target
        self.options = plan.criu_options
        self.criu = plan.criu_path
        self.undo_errors: list[str] = []
        self.stopped_before = {pid for pid in self.target.pids if _status(pid) == psutil.STATUS_STOPPED}
        self.stopped_for_criu: list[int] = []   # stopped by gpusnap, not by the user
        self.notes = plan.notes                 # the snapshot's

    def dump(self, images: str, logs: str, leave_running: bool, pages=None) -> None:
        """pages: serves CRIU's page stream (criu/runner.py), else pages images are written.
        No network lock here (--network-lock skip): the tree is stopped first and its TCP
        connections settle (criu/netlock.py); CRIU records those tasks stopped, and
        self.stopped_for_criu (the manifest's criu.stopped) tells a restore to continue them."""
        leave = "running" if leave_running else "stopped"
        try:
            if self.options.network_lock == "skip":
                # recorded as they are stopped: an interrupt in between still continues them
                self.notes.append(netlock.quiesce(self.pids_now() or self.target.pids,
                                                  self.stopped_before, into=self.stopped_for_criu))
            criu_runner.dump(self.target.root_pid, images, self.options, leave=leave,
                             criu=self.criu, page_server=pages)
            if not leave_running:
                self._refresh_pids()        # frozen now: exactly the tree in the images
        except BaseException as exc:
            # CRIU may have stopped the tree before it failed, or before an interrupt that
            # waited for it (sysrun): dump.py resumes only after a dump that returned.
            if not leave_running:
                self._refresh_pids()
                self.resume()
            root = self.target.root_pid
            if isinstance(exc, CriuFailed) and _status(root) in (None, psutil.STATUS_ZOMBIE):
                raise TargetNotFound(f"process {root} exited during the dump") from None
            raise
        finally:
            if leave_running:               # CRIU let them go on in the state it found: stopped
                send(self.stopped_for_criu, signal.SIGCONT)
            if os.path.exists(os.path.join(images, "dump.log")):
                shutil.move(os.path.join(images, "dump.log"), os.path.join(logs, "dump.log"))

    def _refresh_pids(self) -> None:
        """The tree as CRIU saw it: children forked after plan() (during an SDK prepare
        or the CUDA lock) are stopped with the rest, so they must be killed, resumed and
        recorded with it."""
        now = self.pids_now()
        if not now:
            return
        self.target.pids = sorted(set(self.target.pids) | set(now), key=lambda p: (p != self.target.root_pid, p))

    def pids_now(self) -> list[int]:
        """The tree's pids as they are now ([] once its root is gone)."""
        try:
            return tree_pids(self.target.root_pid)
        except GONE:
            return []

    def criu_dir(self, images: str) -> str:
        return images

    def finish(self) -> None:
        """Killed for good, its memory not waited for: a restore waits for the pids to be
        free itself (targets.process.taken)."""
        kill_for_good(self.target.pids)

    def resume(self) -> None:
        send([pid for pid in self.target.pids if pid not in self.stopped_before], signal.SIGCONT)


def _status(pid: int) -> str | None:
    """psutil's status of pid, or None when it is gone."""
    try:
        return psutil.Process(pid).status()
    except GONE:
        return None
