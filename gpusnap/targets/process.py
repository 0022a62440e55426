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


# what psutil raises for a pid that is gone: 7.2 lets FileNotFoundError out for one that
# exits while it reads /proc/PID (NoSuchProcess otherwise)
GONE = (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError)
PF_KTHREAD = 0x00200000       # /proc/PID/stat flags: a kernel thread


def started(pid: int | None) -> float | None:
    """pid's start time (seconds since the epoch), None when it is gone (or no pid)."""
    if not pid:
        return None
    try:
        return psutil.Process(pid).create_time()
    except GONE:
        return None


def is_kernel_thread(pid: int) -> bool:
    """True for a kernel thread (kthreadd, workers): nothing there for CRIU to dump."""
    from .fds import stat_fields
    fields = stat_fields(pid)
    return fields is not None and bool(int(fields[6]) & PF_KTHREAD)     # field 9: flags


def resolve(pid: int) -> Target:
    if pid <= 1:
        raise UsageError(f"refusing to dump pid {pid}: it is the init process of this "
                         "pid namespace" if pid == 1 else f"{pid} is not a pid")
    if is_kernel_thread(pid):
        raise UsageError(f"pid {pid} is a kernel thread; only user processes can be dumped")
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
    except GONE:
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
    except GONE:
        return [root_pid] if root_pid in recorded else []


def dead(pids: list[int]) -> dict[int, str]:
    """The pids that are gone or zombies, each with how it ended: 'gone', or what a
    zombie's /proc/PID/stat still says ('a zombie, killed by SIGPIPE')."""
    from .fds import stat_fields
    out = {}
    for pid in pids:
        fields = stat_fields(pid)
        if fields is None:
            out[pid] = "gone"
        elif fields[0] in ("Z", "X"):
            out[pid] = "a zombie" + _ending(fields)
    return out


def _ending(fields: list[str]) -> str:
    """', killed by SIGPIPE' or ', exited with 3' from field 52 (exit_code, as waitpid
    reports it), or '' where the kernel does not say."""
    try:
        status = int(fields[49])
    except (IndexError, ValueError):
        return ""
    if status & 0x7f:
        try:
            return f", killed by {signal.Signals(status & 0x7f).name}"
        except ValueError:
            return f", killed by signal {status & 0x7f}"
    return f", exited with {status >> 8}"


def tree_rss(pids: list[int]) -> int:
    """Resident host memory of the pids, in bytes (those gone count 0)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except GONE:
            continue
    return total


def taken(pids: list[int], grace: float = 3.0) -> list[int]:
    """Pids that exist now, zombies included (a zombie's pid can't be reused either).

    When every busy pid is exiting or a zombie (the original was just killed and init
    has not reaped it yet), they get up to grace seconds to be reaped, as kill_and_wait
    gives them.
    """
    busy = [pid for pid in pids if psutil.pid_exists(pid)]
    if busy and all(_going(pid) for pid in busy):
        wait_free(busy, grace, zombie_grace=grace)
        busy = [pid for pid in busy if psutil.pid_exists(pid)]
    return busy


_PF_EXITING = 0x4


def _going(pid: int) -> bool:
    """pid is a zombie, or is exiting (a killed process frees its memory first)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)
    except (OSError, IndexError, ValueError):
        return True                     # gone meanwhile: as good as reaped


def send(pids: list[int], sig: int) -> None:
    """sig to each pid still there."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_and_wait(pids: list[int], timeout: float = 30.0, *, reaped: bool = True) -> None:
    """SIGKILL the pids and wait until their pids are free again, or (reaped=False)
    only until they are dead: zombies whose reaping is up to their parent (init reaps
    an orphan late: 1.6 s seen on the GPU host) and which hold no memory any more."""
    send(pids, signal.SIGKILL)
    wait_free(pids, timeout, zombie_grace=2.0 if reaped else 0.0)


def kill_for_good(pids: list[int], timeout: float = 30.0) -> None:
    """SIGKILL the pids and wait only until each has taken it: exiting, a zombie or gone
    (none of them runs again). Its memory is freed after, which is most of a process's
    death (the CUDA driver's host copy of GPU memory, pinned buffers: a large part of a
    dump's end on the GPU host); a restore waits for the pids to be free (taken())."""
    send(pids, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending and time.monotonic() < deadline:
        pending = [pid for pid in pending if not _going(pid)]
        if pending:
            time.sleep(0.001)


def wait_free(pids: list[int], timeout: float, zombie_grace: float = 2.0) -> None:
    """Wait until the pids are free. Our own children are reaped here; orphans are
    reaped by init, which may take a moment. A zombie whose parent is someone else is
    left to it after zombie_grace seconds."""
    deadline = time.monotonic() + timeout
    zombie_deadline = time.monotonic() + zombie_grace
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
                    if (proc.ppid() != 1 or not zombie_grace) and time.monotonic() >= zombie_deadline:
                        continue
                still.append(pid)
            except (*GONE, ChildProcessError):
                pass
        pending = still
        if pending:
            time.sleep(0.01)
