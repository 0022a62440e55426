"""Restore: materialise the images (verified), CRIU restore, CUDA restore + unlock.

The snapshot is only read: a failed restore leaves it as it was. A tree that CRIU
restored but whose CUDA restore failed is killed, not left half alive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from ..criu import runner as criu_runner
from ..criu.argv import CriuOptions
from ..criu.locate import find_criu
from ..errors import CriuFailed, PidInUse, UsageError
from ..store import Repository
from ..targets.process import kill_and_wait, restored_tree, taken
from . import agent_steps, checkpointer, gpu, imagecache, pagepath, workdir
from .timing import Stages


@dataclass
class RestoreRequest:
    snapshot: str
    gpus: list[str] | None = None
    name: str | None = None             # containers: restore as a new container NAME
    devices: list[str] | None = None    # containers: OLD:NEW host device swaps
    pages: str = "auto"                 # page path: auto, uffd, criu (engine/pagepath.py)


@dataclass
class RestorePlan:
    request: RestoreRequest
    manifest: dict
    criu_path: str
    gpu_pairs: list[tuple[str, str]] | None = None
    notes: list[str] = field(default_factory=list)
    page_path: str = "criu"


def plan(req: RestoreRequest, repo: Repository):
    """A RestorePlan, or for a container snapshot a container_restore plan."""
    manifest = repo.load(repo.resolve(req.snapshot))
    criu_path, _ = find_criu()
    if manifest["target"]["kind"] != "process":
        from . import container_restore
        return container_restore.plan(req, repo, manifest)
    if req.name or req.devices:
        raise UsageError("--name and --device are for container snapshots")
    busy = taken(manifest["pids"])
    if busy:
        raise PidInUse(f"pids {busy} are in use: the original process is probably still running",
                       hint="stop the original first (a zombie's parent must reap it), "
                            "or restore on another host")
    agent_steps.check_weights(manifest)         # SDK: weight files unchanged, or refuse
    p = RestorePlan(request=req, manifest=manifest, criu_path=criu_path)
    p.page_path, notes = pagepath.choose(req.pages, "process")
    p.notes += notes
    if manifest.get("cuda"):
        p.gpu_pairs, p.notes = gpu.plan_remap(manifest["cuda"], req.gpus)
    return p


def execute(plan: RestorePlan, repo: Repository,
            progress: Callable[[int], None] | None = None) -> dict:
    """Returns {'pid', 'snapshot', 'timings', 'notes'} (and 'container' for a container)."""
    if not isinstance(plan, RestorePlan):
        from . import container_restore
        return container_restore.execute(plan, repo, progress)
    m = plan.manifest
    stages = Stages()
    work = workdir.make(repo.path, "restore-")
    images = os.path.join(work, "images")
    root_pid = None
    cuinit = None
    guard = fill = None
    try:
        with repo.shared_lock():                # rm and gc (which drop caches) wait for CRIU
            cached = imagecache.lookup(repo.path, m) if plan.page_path == "criu" else None
            if plan.page_path == "uffd":
                agent_steps.prepare_socket_dirs(m)
                started = []

                def overlap_cuinit():           # once the fill's workers are forked
                    if m.get("cuda"):
                        started.append(gpu.init_in_background())
                root_pid, guard, fill = pagepath.restore_uffd(repo, m, work, stages, progress,
                                                              overlap_cuinit)
                cuinit = started[0] if started else None
            elif cached:
                images = cached                 # warm: `gpusnap warm` verified these already
                repo.last_materialise = None
                plan.notes.append(f"images from the warm cache {os.path.dirname(cached)}")
            else:
                with stages.stage("materialise"):
                    repo.materialise(m, images, progress)
            if plan.page_path == "criu":
                agent_steps.prepare_socket_dirs(m)  # SDK: CRIU re-binds the agent's socket there
                if m.get("cuda"):                   # after materialise: it forks its workers
                    cuinit = gpu.init_in_background()
                with stages.stage("criu_restore"):
                    root_pid = criu_runner.restore(images, CriuOptions(shell_job=m["criu"]["shell_job"]),
                                                   work_dir=work)
        cuda_pids = [p for p in m["cuda"]["pids"]] if m.get("cuda") else []
        if cuda_pids:
            cuda = gpu.session(cuda_pids)
            with stages.stage("cuda_init_wait"):    # what of cuInit did not overlap
                cuinit.join()
            with stages.stage("cuda_restore"):
                cuda.restore_all(plan.gpu_pairs)
            with stages.stage("cuda_unlock"):
                cuda.unlock_all()
        sdk = agent_steps.resume(m, stages)     # SDK: the server reads its weights back
        if guard:
            guard.close(done=True)
            guard = None
        return {"pid": root_pid, "snapshot": m["id"], "timings": stages.to_dict(),
                "notes": plan.notes, "sdk": sdk, "materialise": repo.last_materialise,
                "page_path": plan.page_path, "fill": fill.to_dict() if fill else None}
    except BaseException as exc:
        with checkpointer.unwinding():          # a second Ctrl-C must not cut the undo short
            restored = root_pid if root_pid is not None else criu_runner.restored_pid(work)
            if restored is not None:            # the tree CRIU made, not whoever took those pids
                kill_and_wait(restored_tree(restored, m["pids"]))
            if guard:
                guard.close(done=False)
        if isinstance(exc, CriuFailed) and os.path.exists(os.path.join(work, "restore.log")):
            kept = workdir.keep_log(repo.path, os.path.join(work, "restore.log"), "restore")
            exc.hint = f"CRIU log kept at {kept}" if kept else None
        raise
    finally:
        workdir.remove(work)
