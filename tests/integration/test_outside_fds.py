"""A process tree sharing a descriptor with a process outside it (its stdout piped to
us): dump refuses it (exit 7) before touching it; --force dumps it with a note; its
restore, where nobody holds the other end of the pipe any more, dies at its next write,
and restore says so (exit 11) and leaves nothing running, on both page paths.

And a restored process that dies at its next step for another reason (a file it reads
is gone since the dump): the restore fails alike; with the file back it succeeds.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import wait_pids_free

pytestmark = pytest.mark.root

READER = "import sys, time\nwhile True:\n    open(sys.argv[1]).read()\n    time.sleep(0.3)"
WRITER = "import time\nwhile True:\n    print('x', flush=True)\n    time.sleep(0.02)"


@pytest.fixture
def piped():
    """A writer whose stdout is a pipe to this process (outside its tree)."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    assert proc.stdout.readline() == b"x\n"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


def test_refused_then_forced_then_its_restore_fails_and_leaves_nothing(piped, gpusnap):
    pid = piped.pid
    rc, out, err = gpusnap("dump", "--pid", str(pid))
    assert rc == 7, err
    assert out["error"] == "OutsideDescriptors"
    assert f"pid {pid} stdout is pipe:[" in out["message"], out
    assert str(os.getpid()) in out["message"] and "--force" in out["hint"]
    assert psutil.Process(pid).status() != psutil.STATUS_STOPPED, "untouched"

    rc, snap, err = gpusnap("dump", "--pid", str(pid), "--force", "--name", "piped")
    assert rc == 0, err
    assert any(n.startswith(f"--force: pid {pid} stdout") and "SIGPIPE" in n
               for n in snap["notes"]), snap
    piped.wait(timeout=30)              # gone with the dump; and the reader goes too
    piped.stdout.close()
    rc, info, _ = gpusnap("inspect", "piped")
    assert info["notes"] == snap["notes"]

    from gpusnap.engine.pagepath import uffd_available
    paths = ["criu"] + (["uffd"] if uffd_available()[0] else [])
    for pages in paths:             # the snapshot is untouched: each restore fails alike
        rc, out, err = gpusnap("restore", "piped", "--pages", pages)
        assert rc == 11, (pages, err)
        assert out["error"] == "RestoredTreeDied", out
        assert f"root pid {pid} is " in out["message"], out
        assert "CRIU log kept at" in out["hint"] and snap["notes"][0] in out["hint"], out
        wait_pids_free([pid])
        assert not psutil.pid_exists(pid), f"{pages}: the restored tree is left"
    rc, _, err = gpusnap("verify", "piped")
    assert rc == 0, err


def test_a_restored_process_that_dies_at_its_next_step_fails_the_restore(tmp_path, gpusnap):
    wanted = tmp_path / "wanted"
    wanted.write_text("here")
    proc = subprocess.Popen([sys.executable, "-c", READER, str(wanted)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    restored = None
    try:
        time.sleep(0.5)
        assert proc.poll() is None
        rc, snap, err = gpusnap("dump", "--pid", str(proc.pid))
        assert rc == 0 and snap["notes"] == [], err
        proc.wait(timeout=30)
        wanted.unlink()
        # it reads the file again up to 0.3 s after it is restored: mostly in the window
        rc, out, err = gpusnap("restore", snap["id"], "--pages", "criu",
                               env={"GPUSNAP_SETTLE_MS": "1000"})
        assert rc == 11 and out["error"] == "RestoredTreeDied", err
        assert "exited with 1" in out["message"], out
        wait_pids_free([proc.pid])
        assert not psutil.pid_exists(proc.pid)

        wanted.write_text("back")
        rc, out, err = gpusnap("restore", snap["id"], "--pages", "criu")
        assert rc == 0, err
        restored = out["pid"]
        assert restored == proc.pid and "settle" in out["timings"], out
        assert psutil.Process(restored).status() != psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if restored is not None:
            os.kill(restored, signal.SIGKILL)
            wait_pids_free([restored])


def test_a_terminal_the_tree_does_not_own_is_refused(gpusnap):
    """stdin on a pty whose master is outside the tree (CRIU itself refuses to dump it:
    "Found slave peer index 0 without correspond master peer")."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            stdin=slave, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    os.close(slave)
    try:
        rc, out, err = gpusnap("dump", "--pid", str(proc.pid))
        assert rc == 7 and out["error"] == "OutsideDescriptors", err
        assert f"pid {proc.pid} stdin is /dev/pts/" in out["message"], out
        assert "a terminal the tree does not own" in out["message"], out
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
