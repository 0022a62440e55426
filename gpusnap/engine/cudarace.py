"""A process of the target that starts using the GPU while gpusnap dumps it.

The CUDA lock and checkpoint cover the pids found when the dump was planned. A process
that creates a CUDA context after that (a parent forking GPU workers) is neither locked
nor checkpointed: CRIU then meets its device mappings and fails ("handle_device_vma
plugin failed ... Can't handle non-regular mapping"), or, worse, would dump it half.
gpusnap cannot freeze the tree before the checkpoint (the driver needs the processes
running to lock and checkpoint them), so it looks twice:

- right after the checkpoint, before CRIU: the target's pids again, and which of them
  the driver knows that the session does not (new CUDA processes);
- when CRIU fails: the same question, and whether CRIU's log says it met a device
  mapping of a pid the session does not hold.

Either way the attempt is undone (CUDA restored and unlocked, the tree resumed) and the
dump starts once more from the lock, over the CUDA pids found then; a second race ends
the dump with GpuRace (exit 26), the original running and unlocked.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

from ..errors import GpuRace

_DEVICE_VMA = re.compile(r"non-regular mapping on (\d+)'s map")


class Started(Exception):
    """A CUDA process the session does not hold appeared (pid None: CRIU's log says so
    without naming it). Internal: dump.py undoes the attempt and retries, or raises
    race_error()."""

    def __init__(self, pid: int | None):
        super().__init__(pid)
        self.pid = pid


def newcomers(now: Iterable[int], known: Iterable[int], cuda_pids) -> list[int]:
    """The pids of now that cuda_pids (the driver's test) finds holding CUDA, other than
    the known ones."""
    held = set(known)
    return cuda_pids([pid for pid in now if pid not in held])


def check(now: Iterable[int], known: Iterable[int], cuda_pids) -> None:
    """Started when a process of the target began using CUDA since the session opened."""
    found = newcomers(now, known, cuda_pids)
    if found:
        raise Started(found[0])


def after_criu(errors: list[str], now: Iterable[int], known: Iterable[int], cuda_pids,
               gpu_user=None) -> Started | None:
    """Whether CRIU failed because of the race: the target has a CUDA process the
    session does not hold, or CRIU's error lines name a device mapping of a pid the
    session does not hold (one it holds is checkpointed: no device mapping is left) that
    uses the GPU or is gone already (gpu_user(pid) says; a mapping of another device is
    not this race)."""
    held = set(known)
    found = newcomers(now, held, cuda_pids)
    if found:
        return Started(found[0])
    gpu_user = gpu_user or _gpu_user_or_gone
    for line in errors:
        m = _DEVICE_VMA.search(line)
        if m and int(m.group(1)) not in held and gpu_user(int(m.group(1))):
            return Started(int(m.group(1)))
    return None


def _gpu_user_or_gone(pid: int) -> bool:
    from ..cuda.discover import touches_nvidia
    return not os.path.exists(f"/proc/{pid}") or touches_nvidia(pid) is not False


def race_error(pid: int | None, kind: str) -> GpuRace:
    what = "tree" if kind == "process" else "container"
    who = f": pid {pid}" if pid else ""
    return GpuRace(f"a process of the {what} started using the GPU during the dump{who}",
                   hint="gpusnap undid the dump and tried once more, and it happened again; "
                        "the original runs as before, unlocked. Dump it while it starts no "
                        "GPU processes")
