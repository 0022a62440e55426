"""The shape of a transparent tensor-parallel job on the CPU: a launcher and two ranks it
execs (not forks) that map one deleted /dev/shm segment (NCCL's SHM transport, 33 MiB:
past CRIU's default ghost limit) and hold a TCP connection to each other (the TCP
store). Dumped and restored through the uffd page path, both ranks see the segment and
their own memory as they were. (On the GPUs the same tree with CUDA ranks fails its
restore: this says the segment and the connection are not why.)"""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import wait_pids_free
from s3server import free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="CRIU needs root")

RANK = r"""
import hashlib, mmap, os, signal, socket, sys, time
rank, name, port, state = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
path = "/dev/shm/" + name
if rank == 0:
    with open(path + ".tmp", "wb") as f:
        f.write(os.urandom(33 << 20))
    os.rename(path + ".tmp", path)
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen(1)
    conn, _ = srv.accept()
    srv.close()
else:
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            time.sleep(0.02)
fd = os.open(path, os.O_RDWR)
seg = mmap.mmap(fd, 0)
os.close(fd)
conn.sendall(b"x")
conn.recv(1)
if rank == 0:
    conn.recv(1)                            # rank 1 mapped it too
    os.unlink(path)
else:
    conn.sendall(b"m")
heap = bytearray(os.urandom(16 << 20))
def report(*_):
    conn.sendall(b"p")                      # the connection still carries bytes
    with open(state + ".tmp", "w") as f:
        f.write(hashlib.sha256(seg).hexdigest() + " " + hashlib.sha256(heap).hexdigest())
    os.replace(state + ".tmp", state)
signal.signal(signal.SIGUSR1, report)
def done(*_):
    os._exit(0)
signal.signal(signal.SIGTERM, done)
with open(state + ".ready.tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(state + ".ready.tmp", state + ".ready")
while True:
    time.sleep(0.1)
"""

LAUNCHER = r"""
import os, subprocess, sys, time
rank_code, state, port = sys.argv[1], sys.argv[2], sys.argv[3]
name = "gpusnap-test-seg-%d" % os.getpid()
kids = [subprocess.Popen([sys.executable, "-c", rank_code, str(r), name, port, "%s.%d" % (state, r)],
                         stdin=subprocess.DEVNULL) for r in (0, 1)]
while True:
    time.sleep(0.2)
"""


def _wait(path: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _reports(state: str, ranks: list[int]) -> list[str]:
    out = []
    for r, pid in enumerate(ranks):
        path = f"{state}.{r}"
        if os.path.exists(path):
            os.unlink(path)
        os.kill(pid, signal.SIGUSR1)
        _wait(path)
        with open(path) as f:
            out.append(f.read())
    return out


def _children(root: int) -> set[int]:
    import psutil
    return {c.pid for c in psutil.Process(root).children()}


def test_a_launcher_and_two_ranks_sharing_a_deleted_segment_restore_through_uffd(gpusnap, tmp_path):
    state = str(tmp_path / "rank")
    with open(tmp_path / "log", "ab") as log:
        launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, state, str(free_port())],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
    pids: list[int] = []
    try:
        ranks = []
        for r in (0, 1):
            _wait(f"{state}.{r}.ready")
            with open(f"{state}.{r}.ready") as f:
                ranks.append(int(f.read()))
        pids = [launcher.pid, *ranks]
        shm = set(os.listdir("/dev/shm"))
        assert not any(n.startswith("gpusnap-test-seg-") for n in shm), "the segment is not deleted"
        before = _reports(state, ranks)
        assert before[0].split()[0] == before[1].split()[0], "both ranks map one segment"
        rc, out, err = gpusnap("dump", "--pid", str(launcher.pid))
        assert rc == 0, err
        launcher.wait(30)
        wait_pids_free(pids)
        rc, res, err = gpusnap("restore", out["id"], "--pages", "uffd")
        assert rc == 0, err
        assert res["page_path"] == "uffd" and res["pid"] == launcher.pid
        assert _children(launcher.pid) == set(ranks)
        assert _reports(state, ranks) == before
    finally:
        for pid in reversed(pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.poll()
        wait_pids_free(pids)
