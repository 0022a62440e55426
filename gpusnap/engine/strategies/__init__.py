"""One strategy per kind of target: what differs between dumping and restoring a process
tree (process.py: gpusnap's own CRIU) and a container (container.py: its engine's
checkpoint and restore, docker or podman, one strategy parameterised by the engine).

engine/dump.py orders the steps of every dump and asks the strategy's Dumper for the one
that takes the images; engine/restore.py loads the snapshot and hands it to the strategy
of its kind, which plans (every check before anything is touched) and runs the restore
with its undo.

    Strategy.dumper(plan, cuda)                 a Dumper for one dump
    Strategy.plan_restore(req, manifest, criu)  a RestorePlan, or a refusal
    Strategy.restore(plan, repo, progress)      {'pid', 'snapshot', 'timings', 'notes', ...}

    Dumper.dump(images, logs, leave_running)    write the images under `images`
    Dumper.criu_dir(images)                     where the CRIU image files are inside it
    Dumper.finish()                             the snapshot is committed: the original goes
    Dumper.resume()                             undo a dump that stopped the original;
                                                never raises (what failed: undo_errors)
"""

from __future__ import annotations

from typing import Callable, Protocol

from ...errors import UsageError
from ...model import Target
from ...store import Repository
from ..plans import DumpPlan, DumpRequest, RestorePlan, RestoreRequest


class Dumper(Protocol):
    stage: str                      # the name of the stage that takes the images
    undo_errors: list[str]

    def dump(self, images: str, logs: str, leave_running: bool) -> None: ...

    def criu_dir(self, images: str) -> str: ...

    def finish(self) -> None: ...

    def resume(self) -> None: ...


class Strategy(Protocol):
    kind: str

    def dumper(self, plan: DumpPlan, cuda) -> Dumper: ...

    def plan_restore(self, req: RestoreRequest, manifest: dict, criu_path: str) -> RestorePlan: ...

    def restore(self, plan: RestorePlan, repo: Repository,
                progress: Callable[[int], None] | None = None) -> dict: ...


def for_kind(kind: str) -> Strategy:
    """The strategy for a target kind: 'process', 'docker' or 'podman'."""
    if kind == "process":
        from .process import ProcessStrategy
        return ProcessStrategy()
    from ...targets.containers import ENGINES
    if kind in ENGINES:
        from .container import ContainerStrategy
        return ContainerStrategy(kind)
    raise UsageError(f"unknown kind of target '{kind}'")


def resolve(req: DumpRequest) -> tuple[Strategy, Target]:
    """The target a dump request names, and the strategy of its kind."""
    if req.pid is not None:
        from ...targets import process
        target = process.resolve(req.pid)
    else:
        from ...targets import containers
        target = containers.resolve(req.container, req.engine)
    return for_kind(target.kind), target
