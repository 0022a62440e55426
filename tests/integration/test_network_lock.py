"""A host with neither iptables nor nftables (the GPU machines): CRIU dumps the tree's
loopback connections without its network lock. gpusnap stops the tree and lets the
connections settle first (criu/netlock.py quiesce); a connection whose peer has no room
for what it holds is refused, the tree left running. Found with a stream that hung for
good after its first restore (data moved between CRIU's reads of the two ends)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, path_without_network_lock_tools, wait_pids_free

pytestmark = [pytest.mark.root, pytest.mark.slow]


class Stream:
    """tests/workloads/tcp_stream.py: two processes streaming over loopback TCP."""

    def __init__(self, d: str, burst: bool):
        self.dir = d
        log = open(os.path.join(d, "log"), "ab")
        subprocess.Popen([sys.executable, "-m", "tests.workloads.tcp_stream", "--dir", d,
                          *(["--burst"] if burst else [])], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True, cwd=REPO)
        deadline = time.monotonic() + 30
        while not all(os.path.exists(os.path.join(d, name))
                      for name in ("pid", "status-parent.json", "status-child.json")):
            assert time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.05)
        self.pid = int(open(os.path.join(d, "pid")).read())
        self.pids = [self.pid, *(c.pid for c in psutil.Process(self.pid).children())]

    def counts(self) -> list[dict]:
        out = []
        for who in ("parent", "child"):
            with open(os.path.join(self.dir, f"status-{who}.json")) as f:
                out.append(json.load(f))
        return out

    def streaming(self, blocks: int = 16, timeout: float = 20) -> None:
        """Both ends receive `blocks` more blocks, each in order and whole."""
        first = [c["blocks"] for c in self.counts()]
        deadline = time.monotonic() + timeout
        while True:
            now = self.counts()
            assert all(c["ok"] for c in now), f"data lost or misplaced: {now}"
            if all(c["blocks"] >= f + blocks for c, f in zip(now, first)):
                return
            assert time.monotonic() < deadline, f"the stream stalled: {first} -> {now}"
            time.sleep(0.05)

    def stop(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_pids_free(self.pids)


@pytest.fixture
def no_lock_path():
    path = path_without_network_lock_tools()
    if path is None:
        pytest.skip("CRIU sits beside iptables here")
    return {"PATH": path}


def test_bursts_round_trip_without_the_lock(tmp_path, gpusnap, no_lock_path):
    """Dumped at any moment of its bursts, the stream comes back whole, three times; the
    tasks gpusnap stopped for the dump run again after the restore."""
    s = Stream(str(tmp_path), burst=True)
    try:
        s.streaming()
        for _ in range(3):
            rc, snap, err = gpusnap("dump", "--pid", str(s.pid), env=no_lock_path)
            assert rc == 0, err
            wait_pids_free(s.pids)
            rc, out, err = gpusnap("inspect", snap["id"])
            assert rc == 0, err
            assert sorted(out["criu"]["stopped"]) == sorted(s.pids)
            assert any("TCP sockets settled" in n for n in out["notes"]), out["notes"]
            rc, out, err = gpusnap("restore", snap["id"], env=no_lock_path)
            assert rc == 0, err
            assert all(psutil.Process(p).status() != psutil.STATUS_STOPPED for p in s.pids)
            s.streaming()
    finally:
        s.stop()


def test_a_connection_with_a_full_window_is_refused_and_the_tree_streams_on(tmp_path, gpusnap,
                                                                          no_lock_path, store):
    """Without a pause its receive windows stay full: CRIU would dump data it cannot send
    back on restore without a lock (or, before the tree was stopped first, ends that
    disagree: the restored stream hung). Refused, the original streaming, no snapshot."""
    s = Stream(str(tmp_path), burst=False)
    try:
        s.streaming()
        rc, out, err = gpusnap("dump", "--pid", str(s.pid), env=no_lock_path)
        assert rc == 11, err
        assert "no room" in out["message"] and "iptables" in out["hint"], out
        assert all(psutil.Process(p).status() != psutil.STATUS_STOPPED for p in s.pids)
        s.streaming()
        assert gpusnap("ls")[1] == []
    finally:
        s.stop()
