"""What gpusnap holds (engine/parked.py, `gpusnap ps`), and suspend/resume/switch refusals
that need no CUDA: real processes, a private state directory, nothing touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpusnap.cli import main
from gpusnap.engine import parked


@pytest.fixture
def state(tmp_path, monkeypatch):
    path = str(tmp_path / "state")
    monkeypatch.setenv("GPUSNAP_STATE_DIR", path)
    return path


def run(capsys, *args) -> tuple[int, object]:
    try:
        main(["--json", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def _entry(pid, state="suspended", **more):
    return {"pid": pid, "pids": [pid], "state": state, "kind": "process", "name": "x",
            "container": None, "cuda_pids": [pid], "cuda": None, "sdk": None,
            "snapshot": None, "since": 1.0, **more}


def test_entries_are_written_privately_and_listed(state, sleeper, capsys):
    a, b = sleeper(), sleeper()
    parked.record(_entry(a.pid))
    parked.record(_entry(b.pid, "standby", snapshot="f" * 64))
    assert oct(os.stat(state).st_mode & 0o777) == "0o700"
    assert oct(os.stat(os.path.join(state, f"{a.pid}.json")).st_mode & 0o777) == "0o600"
    code, rows = run(capsys, "ps")
    assert code == 0
    assert [(r["pid"], r["state"]) for r in rows] == sorted([(a.pid, "suspended"), (b.pid, "standby")])
    assert all(r["host_memory"] > 0 for r in rows)
    main_text = subprocess.run([sys.executable, "-m", "gpusnap", "ps"], capture_output=True,
                               text=True, env={**os.environ, "GPUSNAP_STATE_DIR": state})
    assert "standby" in main_text.stdout and f"from {'f' * 12}" in main_text.stdout


def test_entries_of_processes_gone_or_reused_are_dropped(state, sleeper):
    a, b = sleeper(), sleeper()
    parked.record(_entry(a.pid))
    parked.record(_entry(b.pid))
    a.kill()
    a.wait()
    # b's pid taken by a process that started at another time: not the one recorded
    with open(os.path.join(state, f"{b.pid}.json")) as f:
        entry = json.load(f)
    entry["started"] -= 100
    with open(os.path.join(state, f"{b.pid}.json"), "w") as f:
        json.dump(entry, f)
    c = sleeper()
    parked.record(_entry(c.pid))
    assert [e["pid"] for e in parked.entries()] == [c.pid]
    assert sorted(os.listdir(state)) == [f"{c.pid}.json"]


def test_lookup_by_pid_or_container(state, sleeper):
    a, b = sleeper(), sleeper()
    parked.record(_entry(a.pid))
    parked.record(_entry(b.pid, kind="docker", container={"name": "web", "id": "abcdef123456"}))
    assert parked.lookup(a.pid)["pid"] == a.pid
    assert parked.lookup(container="web")["pid"] == b.pid
    assert parked.lookup(container="abcd")["pid"] == b.pid
    assert parked.lookup(container="abc") is None           # too short a prefix
    assert parked.lookup(container="db") is None


def test_resume_of_what_is_not_parked_is_refused(state, sleeper, capsys):
    a = sleeper()
    code, err = run(capsys, "resume", str(a.pid))
    assert code == 25 and err["error"] == "NotParked"
    parked.record(_entry(a.pid, "restored"))                 # restored: running, not parked
    code, err = run(capsys, "resume", str(a.pid))
    assert code == 25
    code, err = run(capsys, "resume", "no-such-container")
    assert code == 25


def test_suspend_of_a_process_without_cuda_is_refused(state, sleeper, capsys):
    a = sleeper()
    code, err = run(capsys, "suspend", str(a.pid))
    assert code == 24 and err["error"] == "NoCudaProcess", err
    assert "no CUDA process" in err["message"]
    assert parked.entries() == []
    code, err = run(capsys, "suspend", "999999999")
    assert code == 5


def test_in_must_be_parked_and_nothing_is_touched(state, sleeper, capsys):
    a, b = sleeper(), sleeper()
    code, err = run(capsys, "switch", str(a.pid), str(b.pid))
    assert code == 25 and err["error"] == "NotParked", err
    parked.record(_entry(b.pid, "restored"))                # running: not parked
    code, err = run(capsys, "switch", str(a.pid), str(b.pid))
    assert code == 25
    assert [(e["pid"], e["state"]) for e in parked.entries()] == [(b.pid, "restored")]


def test_out_needs_cuda_and_in_stays_parked(state, sleeper, capsys):
    a, b = sleeper(), sleeper()
    parked.record(_entry(b.pid))
    code, err = run(capsys, "switch", str(a.pid), str(b.pid))
    assert code == 24 and err["error"] == "NoCudaProcess", err
    assert [(e["pid"], e["state"]) for e in parked.entries()] == [(b.pid, "suspended")]
    code, err = run(capsys, "switch", "999999999", str(b.pid))
    assert code == 5
    code, err = run(capsys, "switch", str(b.pid), str(b.pid))
    assert code == 2 and "same one" in err["message"]
    assert [(e["pid"], e["state"]) for e in parked.entries()] == [(b.pid, "suspended")]
