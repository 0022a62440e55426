"""Restoring a snapshot whose pids are busy: a zombie not yet reaped gets a moment, and
CRIU losing a pid to a concurrent restore is PidInUse (exit 6), not CriuFailed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from gpusnap import sysrun
from gpusnap.criu import runner
from gpusnap.errors import CriuFailed, PidInUse
from gpusnap.targets.process import taken

# A parent that lets its child die at once and reaps it only after argv[1] seconds.
_LATE_REAPER = ("import os,sys,time\n"
                "pid = os.fork()\n"
                "if pid == 0: os._exit(0)\n"
                "print(pid, flush=True); time.sleep(float(sys.argv[1])); os.waitpid(pid, 0)\n"
                "time.sleep(30)\n")


def _zombie(reap_after: float) -> tuple[subprocess.Popen, int]:
    parent = subprocess.Popen([sys.executable, "-c", _LATE_REAPER, str(reap_after)],
                              stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.001)
    return parent, pid


def test_a_zombie_reaped_within_the_grace_is_not_in_use():
    parent, pid = _zombie(1.0)
    try:
        t0 = time.monotonic()
        assert taken([pid], grace=20) == []             # generous: the host may be loaded
        assert time.monotonic() - t0 > 0.5, "it waited for the reap"
    finally:
        parent.kill()
        parent.wait()


def test_a_zombie_left_unreaped_is_in_use_after_the_grace():
    parent, pid = _zombie(60)
    try:
        t0 = time.monotonic()
        assert taken([pid], grace=0.5) == [pid]
        assert time.monotonic() - t0 < 2.0
    finally:
        parent.kill()
        parent.wait()


def test_a_live_pid_is_in_use_at_once():
    t0 = time.monotonic()
    assert taken([os.getpid()]) == [os.getpid()]
    assert time.monotonic() - t0 < 0.5


def _failure(tmp_path, line: str):
    log = tmp_path / "restore.log"
    log.write_text("(00.001000) Warn  (criu/kerndat.c:1): nothing\n" + line + "\n")
    return runner._fail("restore", sysrun.Result(["criu"], 1, "", ""), str(log))


def test_criu_losing_a_pid_to_a_concurrent_restore_is_pid_in_use(tmp_path):
    err = _failure(tmp_path, "(00.041326)   4242: Error (criu/cr-restore.c:1482): "
                             "Can't fork for 4242: File exists")
    assert isinstance(err, PidInUse) and err.exit_code == 6 and "4242" in err.message
    other = _failure(tmp_path, "(00.041326) Error (criu/cr-restore.c:1482): Can't fork for 4242: "
                               "Resource temporarily unavailable")
    assert type(other) is CriuFailed


def test_kill_for_good_returns_once_every_pid_has_taken_the_kill():
    """A dump's end: SIGKILL, then wait only until each process is exiting, a zombie or
    gone, not until its pid is free (a restore waits for that itself)."""
    from gpusnap.targets.process import _going, kill_for_good
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for _ in range(3)]
    try:
        kill_for_good([p.pid for p in procs], timeout=10)
        assert all(_going(p.pid) for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    kill_for_good([procs[0].pid], timeout=1)        # gone already: nothing to wait for
