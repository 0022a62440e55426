"""gpusnap.sdk with real CRIU, on CPU PyTorch: a server whose weights leave the snapshot
and come back from their safetensors file (tests/workloads/sdk_server.py).

Each test checks what the server computes (the SHA-256 of its output on a fixed input)
before and after, and that the server is never left without its weights."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, wait_json, wait_pids_free

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch is not installed (pip install torch)")]

MIB = 64


class Server:
    def __init__(self, state: str, *args: str):
        self.state = state
        os.makedirs(state, exist_ok=True)
        for name in ("ready", "report.json"):
            if os.path.exists(os.path.join(state, name)):
                os.unlink(os.path.join(state, name))
        log = open(os.path.join(state, "log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.workloads.sdk_server", "--state", state,
             "--mib", str(MIB), *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd=REPO)
        ready = wait_json(os.path.join(state, "ready"), proc=self.proc, timeout=120)
        self.pid, self.socket, self.weight_bytes = ready["pid"], ready["socket"], ready["weight_bytes"]

    def report(self, timeout: float = 60) -> dict:
        path = os.path.join(self.state, "report.json")
        if os.path.exists(path):
            os.unlink(path)
        os.kill(self.pid, signal.SIGUSR1)
        return wait_json(path, timeout=timeout)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        wait_pids_free([self.pid])


@pytest.fixture
def server(tmp_path):
    started = []

    def start(*args: str, state: str | None = None) -> Server:
        s = Server(state or str(tmp_path / f"server{len(started)}"), *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def _restored_pid_gone(srv: Server) -> None:
    srv.proc.wait(timeout=30)           # gpusnap killed the original, our child
    wait_pids_free([srv.pid])


def test_weights_leave_the_image_and_come_back(server, gpusnap, tmp_path):
    sockets = str(tmp_path / "sockets")
    plain = server("--no-sdk")
    before = plain.report()
    rc, snap_plain, err = gpusnap("dump", "--pid", str(plain.pid), "--name", "plain")
    assert rc == 0, err
    assert snap_plain["sdk"] is None and snap_plain["notes"] == []
    _restored_pid_gone(plain)

    srv = server("--socket-dir", sockets, state=plain.state)   # same file, same weights
    assert srv.report()["output_sha256"] == before["output_sha256"]
    rc, snap, err = gpusnap("dump", "--pid", str(srv.pid), "--name", "sdk")
    assert rc == 0, err
    sdk = snap["sdk"]
    assert [a["pid"] for a in sdk["agents"]] == [srv.pid]
    assert sdk["agents"][0]["socket"] == f"{sockets}/agent-{srv.pid}.sock"
    assert sdk["bytes_out_of_image"] >= srv.weight_bytes
    assert sdk["agents"][0]["weight_files"][0]["path"] == os.path.join(srv.state, "model.safetensors")
    assert "sdk_prepare" in snap["timings"]
    # the image is smaller by about the weights (and the dropped KV cache)
    saved = snap_plain["bytes_logical"] - snap["bytes_logical"]
    assert saved > 0.9 * srv.weight_bytes, (snap_plain["bytes_logical"], snap["bytes_logical"])
    _restored_pid_gone(srv)

    shutil.rmtree(sockets)              # as after a reboot: restore makes the directory again
    rc, res, err = gpusnap("restore", "sdk")
    assert rc == 0, err
    assert res["pid"] == srv.pid and "sdk_resume" in res["timings"]
    assert res["sdk"]["bytes"] == srv.weight_bytes and res["sdk"]["readers"] == ["cpu"]
    after = srv.report()
    assert after["output_sha256"] == before["output_sha256"]
    assert after["weight_bytes_resident"] == srv.weight_bytes and after["kv_zero"]
    assert after["state"] == "resident"
    # the restored agent answers on its socket, as CRIU re-bound it
    from gpusnap.sdk import request
    assert request(f"{sockets}/agent-{srv.pid}.sock", "status")["state"] == "resident"


def test_leave_running_reads_the_weights_back_into_the_original(server, gpusnap):
    srv = server()
    before = srv.report()
    rc, snap, err = gpusnap("dump", "--pid", str(srv.pid), "--leave-running")
    assert rc == 0, err
    assert snap["sdk"] and "sdk_resume" in snap["timings"]
    after = srv.report()
    assert after["state"] == "resident" and after["output_sha256"] == before["output_sha256"]
    assert after["kv_zero"]             # scratch comes back zeroed


def test_a_failing_prepare_means_a_transparent_dump(server, gpusnap):
    srv = server("--fail-prepare")
    before = srv.report()
    rc, snap, err = gpusnap("dump", "--pid", str(srv.pid))
    assert rc == 0, err
    assert snap["sdk"] is None
    assert any("did not prepare" in n and "transparent" in n for n in snap["notes"]), snap["notes"]
    assert "did not prepare" in err                  # said on stderr too
    _restored_pid_gone(srv)
    rc, res, err = gpusnap("restore", snap["id"])
    assert rc == 0, err
    assert "sdk_resume" not in res["timings"]
    after = srv.report()
    assert after["output_sha256"] == before["output_sha256"] and not after["kv_zero"]


def _fake_criu(tmp_path) -> str:
    from gpusnap.criu.locate import find_criu
    path = tmp_path / "criu-fails"
    path.write_text(f"""#!/bin/sh
case "$1" in
  dump) "{find_criu()[0]}" "$@"; exit 1;;
  *) exec "{find_criu()[0]}" "$@";;
esac
""")
    path.chmod(0o755)
    return str(path)


def test_a_failed_dump_after_prepare_gives_the_weights_back(server, gpusnap, tmp_path):
    """CRIU dumps (and stops the tree), then reports failure: the server is resumed and
    reads its weights back."""
    srv = server()
    before = srv.report()
    rc, out, err = gpusnap("dump", "--pid", str(srv.pid), env={"GPUSNAP_CRIU": _fake_criu(tmp_path)})
    assert rc == 11 and out["error"] == "CriuFailed", err
    after = srv.report()
    assert after["state"] == "resident" and after["output_sha256"] == before["output_sha256"]
    assert after["weight_bytes_resident"] == srv.weight_bytes


def test_restore_refuses_changed_weights_before_restoring_anything(server, gpusnap):
    srv = server()
    rc, snap, err = gpusnap("dump", "--pid", str(srv.pid))
    assert rc == 0, err
    _restored_pid_gone(srv)
    weights = os.path.join(srv.state, "model.safetensors")
    os.utime(weights)
    rc, out, err = gpusnap("restore", snap["id"])
    assert rc == 51 and out["error"] == "WeightsChanged", err
    assert "mtime_ns" in out["message"]
    assert not os.path.exists(f"/proc/{srv.pid}"), "nothing may be restored"
    # the same bytes under the recorded mtime: accepted again
    mtime = snap["sdk"]["agents"][0]["weight_files"][0]["mtime_ns"]
    os.utime(weights, ns=(mtime, mtime))
    rc, res, err = gpusnap("restore", snap["id"])
    assert rc == 0, err
    assert srv.report()["state"] == "resident"
