"""A tree that maps a deleted file larger than CRIU's default ghost limit (NCCL's shared
memory in /dev/shm is such a file): the dump stores it and the restore brings it back."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="CRIU needs root")

HOLDER = r"""
import hashlib, mmap, os, signal, sys, time
state = sys.argv[1]
path = "/dev/shm/gpusnap-ghost-%d" % os.getpid()
with open(path, "wb") as f:
    f.write(os.urandom(6 << 20))
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, 0)
os.close(fd)
os.unlink(path)
digest = hashlib.sha256(m).hexdigest()
def report(*_):
    with open(state + ".tmp", "w") as f:
        f.write(hashlib.sha256(m).hexdigest())
    os.replace(state + ".tmp", state)
signal.signal(signal.SIGUSR1, report)
with open(state + ".ready", "w") as f:
    f.write(digest)
while True:
    time.sleep(0.1)
"""


def _wait(path, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path):
            with open(path) as f:
                return f.read()
        time.sleep(0.05)
    raise TimeoutError(path)


def test_a_deleted_file_past_criu_default_limit_survives_dump_and_restore(gpusnap, tmp_path):
    state = str(tmp_path / "digest")
    with open(tmp_path / "log", "ab") as log:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, state], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, start_new_session=True)
    restored = None
    try:
        before = _wait(state + ".ready")
        rc, out, err = gpusnap("dump", "--pid", str(p.pid))
        assert rc == 0, err
        p.wait(30)
        rc, res, err = gpusnap("restore", out["id"])
        assert rc == 0, err
        restored = res["pid"]
        os.kill(restored, signal.SIGUSR1)
        assert _wait(state) == before
    finally:
        for pid in (p.pid, restored):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        p.poll()
