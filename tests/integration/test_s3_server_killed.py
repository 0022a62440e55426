"""The S3 server process killed (SIGKILL) in the middle of a real dump and of a real
restore: each fails with StoreUnavailable's exit code, the dumped tree keeps running
intact, the restore leaves no restored tree, and no work dir is left behind.

moto keeps its objects in memory, so what a killed server held cannot be inspected
afterwards; that nothing half-written becomes visible is the proxy-cut test's part
(tests/unit/test_s3_store.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import REPO, wait_pids_free
from s3server import S3Server

from gpusnap.errors import StoreUnavailable

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def servers():
    """servers() -> a new S3 server process with a bucket (.bucket_name); all stopped after."""
    started = []

    def start() -> S3Server:
        s = S3Server()
        started.append(s)
        s.bucket_name = s.bucket()
        return s

    yield start
    for s in started:
        s.stop()


def _start(server, tmp_path, cache: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, **server.env(), "GPUSNAP_S3_RETRIES": "2",
           "GPUSNAP_STORE": f"s3://{server.bucket_name}/k", "GPUSNAP_CACHE": cache,
           "GPUSNAP_WORKDIR": str(tmp_path / "work"),
           "GPUSNAP_STATE_DIR": str(tmp_path / "state")}
    return subprocess.Popen([sys.executable, "-m", "gpusnap", "--json", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(server, ready, proc: subprocess.Popen) -> None:
    """SIGKILL the server once ready() holds (the transfer is under way)."""
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, f"finished before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline, "the transfer never started"
        time.sleep(0.01)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)


def _cached(path) -> int:
    """Packs (and chunks kept alone) in the cache at path."""
    return sum(len(fs) for d, _s, fs in os.walk(path)
               if f"{os.sep}packs{os.sep}" in d or f"{os.sep}chunks{os.sep}" in d)


def _workdir_left(tmp_path) -> list[str]:
    work = tmp_path / "work"
    return sorted(os.listdir(work)) if work.exists() else []


def test_server_killed_mid_restore_then_mid_dump(workload, servers, tmp_path):
    server = servers()
    w = workload("--mib", "384", "--children", "1")
    # a good snapshot first (the tree keeps running), then a restore into an empty cache,
    # the server killed once chunks arrive
    ok = _start(server, tmp_path, str(tmp_path / "c0"), "dump", "--pid", str(w.pid), "--leave-running")
    out, err = ok.communicate(timeout=300)
    assert ok.returncode == 0, err
    assert (tmp_path / "work").is_dir()         # the work dir checked below is the one used
    w.kill_all()
    restore = _start(server, tmp_path, str(tmp_path / "c1"), "restore", json.loads(out)["id"])
    _kill_when(server, lambda: _cached(tmp_path / "c1") >= 1, restore)
    out, err = restore.communicate(timeout=120)
    assert restore.returncode == StoreUnavailable.exit_code, (restore.returncode, err)
    assert "did not answer" in out + err
    wait_pids_free(w.pids)
    assert not [p for p in w.pids if psutil.pid_exists(p)], "a restored task is left"
    assert _workdir_left(tmp_path) == []

    # a dump cut by the kill of a fresh server leaves its target running, intact
    server = servers()
    client = server.client()
    w2 = workload("--mib", "384", "--children", "1", name="w2")
    dump = _start(server, tmp_path, str(tmp_path / "c2"), "dump", "--pid", str(w2.pid))
    _kill_when(server, lambda: client.list_objects_v2(
        Bucket=server.bucket_name, Prefix="k/packs/").get("KeyCount", 0) >= 2, dump)
    out, err = dump.communicate(timeout=120)
    assert dump.returncode == StoreUnavailable.exit_code, (dump.returncode, err)
    assert "did not answer" in out + err
    report = w2.report()
    assert report["data_ok"] and report["children_ok"], report
    assert _workdir_left(tmp_path) == []
