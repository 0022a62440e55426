"""Intent records are read as untrusted input; recovery never follows a path it was given
blindly (the kill -9 cases themselves, with real CRIU: tests/integration/test_kill9.py)."""

from __future__ import annotations

import json
import os

import pytest

from gpusnap.engine import intent


def _good(tmp_path) -> dict:
    return intent.Record(op="dump", owner=4242, owner_started=1.0, began=2.0,
                         work=str(tmp_path / "dump-4242-abc"), root=77, pids=[77, 78],
                         cuda={"77": "LOCKED"}, store="/s", snapshot="ab" * 32).__dict__


def _write(tmp_path, raw, mode=0o600) -> str:
    path = tmp_path / "dump-4242.json"
    path.write_text(json.dumps(raw))
    path.chmod(mode)
    return str(path)


def test_a_good_record_reads_back(tmp_path):
    rec = intent.read(_write(tmp_path, _good(tmp_path)))
    assert rec.root == 77 and rec.cuda == {"77": "LOCKED"}


@pytest.mark.parametrize("change", [
    lambda r: [],                                   # not an object
    lambda r: {**r, "extra": 1},
    lambda r: {k: v for k, v in r.items() if k != "work"},
    lambda r: {**r, "op": "gc"},
    lambda r: {**r, "owner": 1},
    lambda r: {**r, "pids": [-5]},
    lambda r: {**r, "pids": "77"},
    lambda r: {**r, "root": True},
    lambda r: {**r, "cuda": {"77": "GONE"}},
    lambda r: {**r, "cuda": ["77"]},
    lambda r: {**r, "snapshot": "../../etc"},
    lambda r: {**r, "stage": "x; rm -rf /"},
    lambda r: {**r, "leave_running": "yes"},
    lambda r: {**r, "work": "relative/dump-4242-abc"},
    lambda r: {**r, "work": "/tmp/dump-4242-abc/../../etc"},
    lambda r: {**r, "work": "/etc"},
    lambda r: {**r, "work": "/tmp/dump-999-abc"},    # another gpusnap's
    lambda r: {**r, "work": "/tmp/restore-4242-abc"},
], ids=lambda f: "")
def test_a_malformed_record_is_refused(tmp_path, change):
    with pytest.raises(ValueError):
        intent.read(_write(tmp_path, change(_good(tmp_path))))


def test_a_record_others_can_write_or_a_link_is_refused(tmp_path):
    path = _write(tmp_path, _good(tmp_path), mode=0o622)
    with pytest.raises(ValueError):
        intent.read(path)
    os.chmod(path, 0o600)
    link = tmp_path / "dump-1.json"
    link.symlink_to(path)
    with pytest.raises(OSError):
        intent.read(str(link))


def test_recover_leaves_an_invalid_record_alone(tmp_path):
    path = _write(tmp_path, {**_good(tmp_path), "op": "gc"})
    assert intent.recover(path) is None
    assert os.path.exists(path)


def test_remove_work_only_removes_a_private_dir_never_a_link(tmp_path):
    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "keep").write_text("x")
    link = base / "dump-1-link"
    link.symlink_to(victim)
    assert not intent.remove_work(str(link))
    assert (victim / "keep").exists()
    open_dir = base / "dump-1-open"
    open_dir.mkdir(mode=0o700)
    open_dir.chmod(0o777)
    assert not intent.remove_work(str(open_dir)) and open_dir.exists()
    mine = base / "dump-1-mine"
    mine.mkdir(mode=0o700)
    (mine / "images").mkdir()
    assert intent.remove_work(str(mine)) and not mine.exists()


def test_same_process_needs_the_recorded_start_time():
    me = os.getpid()
    assert intent.same_process(me, intent.started(me))
    assert not intent.same_process(me, intent.started(me) - 10)
    assert not intent.same_process(0, 1.0)


OWNER = """
import os, sys, tempfile, time
from gpusnap.engine import intent
work = tempfile.mkdtemp(prefix=f"dump-{os.getpid()}-", dir=sys.argv[1])
target = int(sys.argv[2])
intent.Intent.begin("dump", work, root=target, root_started=intent.started(target),
                    store=sys.argv[3])
print(work, flush=True)
time.sleep(600)
"""


def test_the_guard_resumes_the_target_when_gpusnap_is_killed(tmp_path, monkeypatch):
    """No CRIU: a stopped process stands for the tree CRIU left stopped; the owner is a
    python that records the dump and is killed -9 (the guard recovers in a fresh python)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil
    monkeypatch.setenv("GPUSNAP_STATE_DIR", str(tmp_path / "state"))
    base = tmp_path / "work"
    base.mkdir(mode=0o700)
    target = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        os.kill(target.pid, signal.SIGSTOP)
        owner = subprocess.Popen([sys.executable, "-c", OWNER, str(base), str(target.pid),
                                  str(tmp_path / "store")], stdout=subprocess.PIPE, text=True)
        work = owner.stdout.readline().strip()
        assert os.path.isdir(work)
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 30
        while os.listdir(tmp_path / "state" / "intents") != ["done"]:
            assert time.monotonic() < deadline, os.listdir(tmp_path / "state" / "intents")
            time.sleep(0.05)
        assert psutil.Process(target.pid).status() != psutil.STATUS_STOPPED
        assert not os.path.exists(work)
        (note,) = intent.notes()
        assert note["action"] == "the target was resumed" and note["pid"] == target.pid
    finally:
        target.kill()
        target.wait()


RESTORER = """
import os, subprocess, sys, tempfile, time
from gpusnap.engine import intent
work = tempfile.mkdtemp(prefix=f"restore-{os.getpid()}-", dir=sys.argv[1])
tree = subprocess.Popen(["sleep", "600"], start_new_session=True)   # what CRIU restored
intent.Intent.begin("restore", work, snapshot="ab" * 32, pids=[tree.pid])
with open(os.path.join(work, "restored.pid"), "w") as f:                # CRIU's pidfile
    f.write(str(tree.pid))
print(tree.pid, flush=True)
time.sleep(600)
"""


def test_the_guard_kills_a_restored_tree_never_reported(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    import psutil
    monkeypatch.setenv("GPUSNAP_STATE_DIR", str(tmp_path / "state"))
    base = tmp_path / "work"
    base.mkdir(mode=0o700)
    owner = subprocess.Popen([sys.executable, "-c", RESTORER, str(base)],
                             stdout=subprocess.PIPE, text=True)
    tree = int(owner.stdout.readline())
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 30
    while psutil.pid_exists(tree) and psutil.Process(tree).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the restored tree lives on"
        time.sleep(0.05)
    while os.listdir(tmp_path / "state" / "intents") != ["done"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert os.listdir(base) == []
    (note,) = intent.notes()
    assert "killed" in note["action"], note
