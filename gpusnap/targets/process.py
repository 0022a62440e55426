"""A process tree named by its root pid."""

from __future__ import annotations

import os
import signal
import time

import psutil

from ..errors import TargetNotFound, UsageError
from ..model import Target


def tree_pids(root_pid: int) -> list[int]:
    proc = psutil.Process(root_pid)
    return [root_pid] + sorted(p.pid for p in proc.children(recursive=True))


def resolve(pid: int) -> Target:
    if pid <= 1:
        raise UsageError(f"refusing to dump pid {pid}")
    if pid == os.getpid():
        raise UsageError("gpusnap cannot dump itself")
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise TargetNotFound(f"process {pid} is a zombie")
        pids = tree_pids(pid)
        cmdline = proc.cmdline()
        name = proc.name()
        shell_job = os.getsid(pid) != pid
    except (psutil.NoSuchProcess, ProcessLookupError):
        raise TargetNotFound(f"no process {pid}") from None
    if os.getpid() in pids:
        raise UsageError(f"process {pid} is an ancestor of gpusnap; start it in its own session")
    return Target(kind="process", root_pid=pid, pids=pids, name=name, cmdline=cmdline,
                  shell_job=shell_job)


def restored_tree(root_pid: int, recorded: list[int]) -> list[int]:
    """The pids of a tree that was just restored from root_pid: its live descendants, and
    no pid outside it even if the snapshot recorded it (someone else may hold it now)."""
    try:
        return tree_pids(root_pid)
    except psutil.NoSuchProcess:
        return [root_pid] if root_pid in recorded else []


def tree_rss(pids: list[int]) -> int:
    """Resident host memory of the pids, in bytes (those gone count 0)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def taken(pids: list[int]) -> list[int]:
    """Pids that exist now, zombies included (a zombie's pid can't be reused either)."""
    return [pid for pid in pids if psutil.pid_exists(pid)]


def kill_and_wait(pids: list[int], timeout: float = 30.0) -> None:
    """SIGKILL the pids and wait until their pids are free again.

    Our own children are reaped here; orphans are reaped by init, which may take a
    moment. A zombie whose parent is someone else is left to it after a short grace.
    """
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    zombie_deadline = time.monotonic() + 2.0
    pending = list(pids)
    while pending and time.monotonic() < deadline:
        still = []
        for pid in pending:
            try:
                proc = psutil.Process(pid)
                if proc.status() == psutil.STATUS_ZOMBIE:
                    if proc.ppid() == os.getpid():
                        os.waitpid(pid, 0)
                        continue
                    if proc.ppid() != 1 and time.monotonic() > zombie_deadline:
                        continue
                still.append(pid)
            except (psutil.NoSuchProcess, ChildProcessError):
                pass
        pending = still
        if pending:
            time.sleep(0.01)
