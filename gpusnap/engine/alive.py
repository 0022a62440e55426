"""A restore reports success only for a tree that runs.

The restored tree is looked at once CRIU is done, and again once it has run for a short
settle window since CUDA was unlocked (SDK agents read their weights back inside it): a
process that dies at its first step (a write to a pipe nobody reads any more, a file gone
since the dump) has died by then. What the window still has to wait adds to time to first
token, so it is short: GPUSNAP_SETTLE_MS, 100 ms by default (0: look once, without waiting).
"""

from __future__ import annotations

import os
import time

from ..errors import RestoredTreeDied, UsageError
from .timing import Stages

DEFAULT_SETTLE_MS = 100


def settle_seconds() -> float:
    raw = os.environ.get("GPUSNAP_SETTLE_MS", "")
    if not raw:
        return DEFAULT_SETTLE_MS / 1000
    if not raw.isdigit():
        raise UsageError(f"GPUSNAP_SETTLE_MS={raw!r} is not a number of milliseconds")
    return int(raw) / 1000


def check_tree(root: int, pids: list[int], when: str, notes: list[str] = ()) -> None:
    """RestoredTreeDied if the root or another restored pid is gone or a zombie; its
    hint quotes the snapshot's notes (what a dump --force let through, say)."""
    from ..targets.process import dead
    gone = dead([root, *(p for p in pids if p != root)])
    if gone:
        what = "; ".join(f"{'root ' if pid == root else ''}pid {pid} is {how}"
                         for pid, how in sorted(gone.items(), key=lambda kv: kv[0] != root))
        said = f"the snapshot's notes: {' | '.join(notes)}; " if notes else ""
        raise RestoredTreeDied(f"the restored tree died {when}: {what}",
                               hint=f"{said}the snapshot is unchanged")


def settle_and_check(root: int, pids: list[int], stages: Stages, notes: list[str] = (),
                     running_since: float | None = None) -> None:
    """check_tree() once the tree has run for the settle window (stage 'settle'):
    running_since (time.monotonic()) is when it was let run last (CRIU's restore done,
    or CUDA unlocked); a tree that has run that long already (an SDK agent reading its
    weights back, say) is looked at without waiting."""
    seconds = settle_seconds()
    with stages.stage("settle"):
        ran = time.monotonic() - running_since if running_since is not None else 0.0
        if ran < seconds:
            time.sleep(seconds - ran)
            ran = seconds
        check_tree(root, pids, f"{ran * 1000:.0f} ms after it ran again", notes)


def settle_and_check_container(engine, restored: dict, stages: Stages) -> None:
    """The container restored is still running after the settle window."""
    seconds = settle_seconds()
    with stages.stage("settle"):
        time.sleep(seconds)
        running, _ = engine.state(restored["id"])
    if not running:
        raise RestoredTreeDied(f"the restored {engine.kind} container {restored['name']} "
                               f"stopped {seconds * 1000:.0f} ms after the restore",
                               hint="the restored container is removed (or, restored "
                                    "into, killed); the snapshot is unchanged")
