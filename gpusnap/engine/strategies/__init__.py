"""One strategy per kind of target: what differs between dumping and restoring a process
tree (process.py: gpusnap's own CRIU) and a container (container.py: its engine's
checkpoint and restore, docker or podman, one strategy parameterised by the engine).
The interface, Strategy and Dumper, is in engine/plans.py with the plans that carry it.

engine/dump.py orders the steps of every dump and asks the strategy's Dumper for the one
that takes the images; engine/restore.py loads the snapshot and hands it to the strategy
of its kind, which plans (every check before anything is touched) and runs the restore
with its undo. for_kind() and resolve() are the only places that look at the kind.
"""

from __future__ import annotations

from ...errors import UsageError
from ...model import Target
from ..plans import DumpRequest, Dumper, Strategy

__all__ = ["Dumper", "Strategy", "for_kind", "resolve"]


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
