"""A server that closed a connection it accepted moments before the dump (NCCL's
bootstrap does this on every rank) leaves it in TIME_WAIT on its listening port. Its
listener has no SO_REUSEADDR, so CRIU's bind of it at restore fails with EADDRINUSE for
the next 60 s unless gpusnap drops those entries first (criu/timewait.py): restored at
once, on both page paths, the server listens and answers."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import wait_pids_free

from gpusnap.criu import timewait

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="CRIU needs root")

SERVER = r"""
import os, socket, sys, time
srv = socket.socket()                       # no SO_REUSEADDR, as NCCL's listeners
srv.bind(("127.0.0.1", 0))
srv.listen(8)
port = srv.getsockname()[1]
peer = socket.create_connection(("127.0.0.1", port))
conn, _ = srv.accept()
conn.close()                                # the server closes first: its end lingers
time.sleep(0.05)
peer.close()
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(port))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    conn, _ = srv.accept()
    conn.sendall(b"ok")
    conn.close()
"""


def _port(path: str, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    with open(path) as f:
        return int(f.read())


def _answer(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(2)


@pytest.mark.parametrize("pages", ["uffd", "criu"])
def test_a_listener_with_a_connection_in_time_wait_restores_at_once(gpusnap, tmp_path, pages):
    ready = str(tmp_path / "port")
    with open(tmp_path / "log", "ab") as log:
        server = subprocess.Popen([sys.executable, "-c", SERVER, ready], stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=log, start_new_session=True)
    try:
        port = _port(ready)
        assert _answer(port) == b"ok"
        assert timewait.time_wait({port}), "the test's connection is not in TIME_WAIT"
        rc, out, err = gpusnap("dump", "--pid", str(server.pid))
        assert rc == 0, err
        server.wait(30)
        wait_pids_free([server.pid])
        assert timewait.time_wait({port}), "TIME_WAIT outlived by the dump: nothing to test"
        rc, res, err = gpusnap("restore", out["id"], "--pages", pages)
        assert rc == 0, err
        assert any("TIME_WAIT" in n and str(port) in n for n in res["notes"]), res["notes"]
        assert _answer(port) == b"ok"
    finally:
        try:
            os.kill(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.poll()
        wait_pids_free([server.pid])
