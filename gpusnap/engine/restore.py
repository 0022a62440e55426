"""Restore: load the snapshot, then the strategy of its kind plans and runs the restore.

A process tree: materialise the images (verified), CRIU restore, CUDA restore + unlock,
SDK resume (engine/strategies/process.py). A container: its engine restores it from the
images, then CUDA restore + unlock (engine/strategies/container.py). The snapshot is
only read: a failed restore leaves it as it was, and nothing it restored half alive.
"""

from __future__ import annotations

import time
from typing import Callable

from ..criu.locate import find_criu
from ..store import Repository
from . import alive, strategies
from .plans import RestorePlan, RestoreRequest

__all__ = ["RestorePlan", "RestoreRequest", "execute", "plan"]


def plan(req: RestoreRequest, repo: Repository) -> RestorePlan:
    """Every check that can fail, before anything is restored."""
    manifest = repo.load_ref(req.snapshot)
    criu_path, _ = find_criu()
    alive.settle_seconds()              # a bad GPUSNAP_SETTLE_MS is refused here, not after CRIU
    strategy = strategies.for_kind(manifest.target.kind)
    return strategy.plan_restore(req, manifest, criu_path)


def execute(plan: RestorePlan, repo: Repository,
            progress: Callable[[int], None] | None = None) -> dict:
    """Returns {'pid', 'snapshot', 'timings', 'notes'}, and for a process 'sdk' and
    'materialise' and 'standby' ({host_memory} of a --standby), for a container
    'container': {engine, id, name}. The tree is recorded for `gpusnap ps`."""
    result = plan.strategy.restore(plan, repo, progress)
    if not plan.request.standby:            # a standby recorded itself (engine/park.py)
        from . import parked
        m = plan.manifest
        parked.record_quietly({
            "pid": result["pid"], "pids": None, "state": "restored", "kind": m.target.kind,
            "name": m.name or m.target.name, "container": result.get("container"),
            "cuda_pids": None, "cuda": None, "sdk": None, "snapshot": m.id,
            "since": time.time()}, result["notes"])
    return result
