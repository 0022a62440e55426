"""A process tree sharing a descriptor with a process outside it (its stdout piped to
us): dump refuses it (exit 7) before touching it; --force dumps it with a note; its
restore, where nobody holds the other end of the pipe any more, dies at its next write,
and restore says so (exit 11) and leaves nothing running, on both page paths.
"""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from tests.conftest import wait_pids_free

pytestmark = pytest.mark.root

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
        assert "CRIU log kept at" in out["hint"], out
        wait_pids_free([pid])
        assert not psutil.pid_exists(pid), f"{pages}: the restored tree is left"
    rc, _, err = gpusnap("verify", "piped")
    assert rc == 0, err
