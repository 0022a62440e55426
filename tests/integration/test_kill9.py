"""kill -9 of gpusnap mid-dump and mid-restore, with real CRIU on a real process tree.

The promise (engine/intent.py): whatever happens to gpusnap, a dumped target runs again
unless its snapshot was committed (then it ends as documented: killed, or running with
--leave-running); a restore that never reported success leaves no tree; no work dir is
left. Stages are hit with a CRIU wrapper that pauses around the real CRIU (as in
test_faults.py: it waits there until gpusnap is killed) and with GPUSNAP_TEST_PAUSE=STAGE:FILE for
gpusnap's own stages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import AFTER_CRIU, BEFORE_CRIU, REPO, release, wait_pids_free

pytestmark = [pytest.mark.root]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Work dirs and intent records of this test only (inherited by every gpusnap)."""
    import tempfile
    work = tempfile.mkdtemp(prefix="gpusnap-kill9-", dir="/dev/shm")
    monkeypatch.setenv("GPUSNAP_WORKDIR", work)
    monkeypatch.setenv("GPUSNAP_STATE_DIR", str(tmp_path / "state"))
    yield work
    subprocess.run(["rm", "-rf", work], check=False)


def _criu_wrapper(tmp_path, op: str, body: str) -> str:
    """A CRIU whose OP runs body: $REAL is the real CRIU, $MARK the file the test waits for."""
    from gpusnap.criu.locate import find_criu
    path = tmp_path / "criu-wrapper"
    path.write_text(f"""#!/bin/sh
REAL="{find_criu()[0]}"
MARK="{tmp_path / 'mark'}"
case "$1" in
  {op}) {body};;
  *) exec "$REAL" "$@";;
esac
""")
    path.chmod(0o755)
    return str(path)


def _start(store: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpusnap", "--json", "--store", store, *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _at_mark(proc: subprocess.Popen, mark: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(mark):
        assert proc.poll() is None, f"gpusnap ended before {mark}: {proc.communicate()}"
        assert time.monotonic() < deadline, mark
        time.sleep(0.005)


def _kill9_at(proc: subprocess.Popen, mark: str) -> None:
    _at_mark(proc, mark)
    proc.kill()
    proc.communicate()
    release(mark)           # a CRIU wrapper waiting there goes on


def _intents() -> list[str]:
    d = os.path.join(os.environ["GPUSNAP_STATE_DIR"], "intents")
    return [n for n in os.listdir(d) if n.endswith(".json")] if os.path.isdir(d) else []


def _wait_recovered(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _intents():
        assert time.monotonic() < deadline, f"not recovered: {_intents()}"
        time.sleep(0.05)


def _notes(gpusnap) -> list[dict]:
    rc, rows, err = gpusnap("ps")
    assert rc == 0, err
    return [r["recovery"] for r in rows if r["state"] == "recovered"]


def _assert_runs(w, *, children: int = 1) -> None:
    states = {psutil.Process(p).status() for p in w.pids}
    assert psutil.STATUS_STOPPED not in states, states
    report = w.report()
    assert report["data_ok"] and report["children_ok"] and report["threads_moving"], report
    assert len(report["children"]) == children, report


def _assert_no_work_dir(work: str) -> None:
    assert not os.listdir(work), f"work dirs left: {os.listdir(work)}"


@pytest.mark.parametrize("stage", ["criu_dump", "criu_dump_after", "pages_finish", "zero_elide", "ingest",
                                   "commit"])
def test_kill9_during_dump_resumes_the_target(workload, gpusnap, store, tmp_path, isolated, stage):
    """Until the commit, the guard resumes the tree (after letting CRIU finish).
    zero_elide is a stage of the staged page path only."""
    w = workload("--mib", "32", "--children", "1", "--threads", "1")
    mark = str(tmp_path / "mark")
    if stage.startswith("criu_dump"):
        env = {"GPUSNAP_CRIU": _criu_wrapper(tmp_path, "dump", BEFORE_CRIU if stage == "criu_dump"
                                             else AFTER_CRIU)}
    else:
        env = {"GPUSNAP_TEST_PAUSE": f"{stage}:{mark}"}
    pages = ["--pages", "staged"] if stage == "zero_elide" else []
    proc = _start(store, "dump", "--pid", str(w.pid), *pages, env=env)
    _kill9_at(proc, mark)
    _wait_recovered()
    _assert_runs(w)
    _assert_no_work_dir(isolated)
    notes = _notes(gpusnap)
    assert len(notes) == 1 and "resumed" in notes[0]["action"], notes
    assert gpusnap("ls")[1] == [], "no snapshot was committed"


@pytest.mark.parametrize("leave_running", [False, True], ids=["default", "leave_running"])
def test_kill9_after_the_commit_ends_the_target_as_documented(workload, gpusnap, store, tmp_path,
                                                              isolated, leave_running):
    w = workload("--mib", "32", "--children", "1")
    mark = str(tmp_path / "mark")
    args = ["dump", "--pid", str(w.pid)] + (["--leave-running"] if leave_running else [])
    proc = _start(store, *args, env={"GPUSNAP_TEST_PAUSE": f"committed:{mark}"})
    _kill9_at(proc, mark)
    _wait_recovered()
    snaps = gpusnap("ls")[1]
    assert len(snaps) == 1, snaps
    _assert_no_work_dir(isolated)
    if leave_running:
        _assert_runs(w)
        return
    w.reap()
    wait_pids_free(w.pids)
    assert not any(psutil.pid_exists(p) for p in w.pids), "killed once committed"
    assert "committed" in _notes(gpusnap)[0]["action"]
    rc, out, err = gpusnap("restore", snaps[0]["id"])
    assert rc == 0, err
    _assert_runs(w)


def test_a_record_whose_guard_died_too_is_recovered_by_the_next_gpusnap(workload, gpusnap, store,
                                                                        tmp_path, isolated):
    w = workload("--mib", "32", "--children", "1")
    mark = str(tmp_path / "mark")
    proc = _start(store, "dump", "--pid", str(w.pid), env={"GPUSNAP_TEST_PAUSE": f"ingest:{mark}"})
    _at_mark(proc, mark)
    (name,) = _intents()
    with open(os.path.join(os.environ["GPUSNAP_STATE_DIR"], "intents", name)) as f:
        guard = json.load(f)["guard"]
    os.kill(guard, signal.SIGKILL)          # the guard first, then gpusnap: nobody left
    proc.kill()
    proc.communicate()
    time.sleep(0.2)
    assert psutil.Process(w.pid).status() == psutil.STATUS_STOPPED
    assert _intents(), "the record stays until a gpusnap starts"
    rc, rows, err = gpusnap("ps")           # any command recovers first
    assert rc == 0, err
    assert not _intents()
    assert [r["state"] for r in rows] == ["recovered"], rows
    _assert_runs(w)
    _assert_no_work_dir(isolated)


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill9_during_criu_restore_leaves_no_tree(workload, gpusnap, store, tmp_path, isolated, when):
    """A restore that never reported success: the tree CRIU made is killed once CRIU is
    done (after: it was already running, and its pid never reported)."""
    w = workload("--mib", "32", "--children", "1")
    rc, snap, err = gpusnap("dump", "--pid", str(w.pid))
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)
    wrapper = _criu_wrapper(tmp_path, "restore", BEFORE_CRIU if when == "before" else AFTER_CRIU)
    proc = _start(store, "restore", "--pages", "criu", snap["id"], env={"GPUSNAP_CRIU": wrapper})
    _kill9_at(proc, str(tmp_path / "mark"))
    _wait_recovered()
    wait_pids_free(w.pids)
    assert not any(psutil.pid_exists(p) for p in w.pids), "the unreported tree is killed"
    _assert_no_work_dir(isolated)
    notes = _notes(gpusnap)
    assert len(notes) == 1 and "killed" in notes[0]["action"], notes
    rc, out, err = gpusnap("restore", snap["id"])
    assert rc == 0, err
    _assert_runs(w)


def test_sigterm_after_the_commit_says_the_snapshot_exists(workload, gpusnap, store, tmp_path, isolated):
    """The manifest is in: gpusnap ends the original as documented and says so (exit 130)."""
    w = workload("--mib", "32", "--children", "1")
    mark = str(tmp_path / "mark")
    proc = _start(store, "dump", "--pid", str(w.pid), env={"GPUSNAP_TEST_PAUSE": f"committed:{mark}"})
    _at_mark(proc, mark)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    snaps = gpusnap("ls")[1]
    assert len(snaps) == 1, snaps
    assert f"snapshot {snaps[0]['id']} was committed" in json.loads(out)["message"], out
    assert "undone" not in err
    w.reap()
    wait_pids_free(w.pids)
    assert not any(psutil.pid_exists(p) for p in w.pids)
    assert not _intents() and _notes(gpusnap) == []
    _assert_no_work_dir(isolated)


def test_interrupt_during_the_commit_fsync(workload, store, monkeypatch, isolated):
    """Ctrl-C lands in the directory fsync after the manifest's rename (in-process)."""
    from gpusnap import paths
    from gpusnap.engine import dump
    from gpusnap.errors import Interrupted
    from gpusnap.store import Repository
    w = workload("--mib", "16", "--children", "1")
    real = paths.fsync_dir

    def fsync_then_interrupt(path):
        real(path)
        if path.endswith("snapshots") and os.listdir(path):
            raise KeyboardInterrupt
    monkeypatch.setattr(paths, "fsync_dir", fsync_then_interrupt)
    repo = Repository.open(store)
    with pytest.raises(Interrupted) as caught:
        dump.execute(dump.plan(dump.DumpRequest(pid=w.pid)), repo)
    (snap,) = repo.snapshot_ids()
    assert f"snapshot {snap} was committed" in caught.value.message
    w.reap()
    wait_pids_free(w.pids)
    assert not any(psutil.pid_exists(p) for p in w.pids), "the original ends as documented"
    _assert_no_work_dir(isolated)
