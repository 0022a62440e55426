"""kill -9 of gpusnap mid-dump of a CUDA process: the guard restores and unlocks CUDA and
resumes the tree (engine/intent.py; the CPU cases: tests/integration/test_kill9.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.root]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("stage", ["criu_dump", "ingest"])
def test_kill9_mid_dump_gives_cuda_back(start_holder, store, tmp_path, stage):
    from gpusnap.cuda import get_driver
    holder = start_holder(gib=1.0, mode="graphs")
    before = holder.check()
    mark = str(tmp_path / "mark")
    state = str(tmp_path / "state")
    env = {**os.environ, "GPUSNAP_STORE": store, "GPUSNAP_STATE_DIR": state,
           "GPUSNAP_TEST_PAUSE": f"{stage}:{mark}"}
    proc = subprocess.Popen([sys.executable, "-m", "gpusnap", "--json", "dump", "--pid",
                             str(holder.pid)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not os.path.exists(mark):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    # criu_dump: CUDA is locked and checkpointed, CRIU not started yet (later the tree is
    # stopped, and the driver answers nothing about a stopped process)
    if stage == "criu_dump":
        assert get_driver().get_state(holder.pid).name == "CHECKPOINTED"
    proc.kill()
    proc.wait()
    intents = os.path.join(state, "intents")
    while [n for n in os.listdir(intents) if n.endswith(".json")]:
        assert time.monotonic() < deadline + 120, "not recovered"
        time.sleep(0.1)
    assert get_driver().get_state(holder.pid).name == "RUNNING"
    after = holder.check()
    assert after["intact"] and after["graphs_ok"] and after["checksum"] == before["checksum"]
