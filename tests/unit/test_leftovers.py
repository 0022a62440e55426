"""What gpusnaps killed outright leave behind is swept: work dirs and agent sockets of
gone pids, failed logs beyond the newest KEEP_FAILED_LOGS; nothing of a live owner."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from gpusnap.cli import cli
from gpusnap.engine import workdir
from gpusnap.store import Repository


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def leftovers(tmp_path, monkeypatch):
    """A store, a work base and an agent dir holding leftovers of a dead pid, live ones
    of this process, and things that only look like leftovers."""
    store = str(tmp_path / "store")
    Repository.open(store)
    base = tmp_path / "work"
    agents = tmp_path / "agents"
    base.mkdir(mode=0o700)
    agents.mkdir(mode=0o700)
    monkeypatch.setenv("GPUSNAP_WORKDIR", str(base))
    monkeypatch.setenv("GPUSNAP_AGENT_DIR", str(agents))
    dead, me = _dead_pid(), os.getpid()
    for name in (f"dump-{dead}-abc", f"restore-{dead}-def", f"restore-{me}-ghi", "cache", "dump-x-1"):
        (base / name / "images").mkdir(parents=True)
    (base / f"warm-{dead}-jkl").symlink_to(tmp_path / "store")
    logs = tmp_path / "store" / "failed-logs"
    logs.mkdir(mode=0o700)
    for i in range(workdir.KEEP_FAILED_LOGS + 5):
        (logs / f"dump-{i}.log").write_text("x")
        os.utime(logs / f"dump-{i}.log", (1_000_000 + i, 1_000_000 + i))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(agents / f"agent-{dead}.sock"))
    stale.close()                       # its server died: the file stays
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(agents / f"agent-{me}.sock"))
    live.listen(1)
    (agents / f"agent-{_dead_pid()}.sock").write_text("not a socket")
    yield store, base, agents, dead
    live.close()


def _left(base, agents, store) -> set[str]:
    return set(os.listdir(base)) | set(os.listdir(agents)) | {
        f"log:{n}" for n in os.listdir(os.path.join(store, "failed-logs"))}


def test_a_new_work_dir_sweeps_what_dead_gpusnaps_left(leftovers):
    store, base, agents, dead = leftovers
    before = _left(base, agents, store)
    work = workdir.make(store, "dump-")
    assert os.path.basename(work).startswith(f"dump-{os.getpid()}-")
    gone = before - _left(base, agents, store)
    assert gone == {f"dump-{dead}-abc", f"restore-{dead}-def", f"agent-{dead}.sock",
                    *(f"log:dump-{i}.log" for i in range(5))}
    assert os.path.exists(store), "a symlink there is left alone, never followed"


def test_gc_reports_leftovers_on_dry_run_and_removes_them(leftovers):
    store, base, agents, dead = leftovers
    before = _left(base, agents, store)
    res = CliRunner().invoke(cli, ["--store", store, "--json", "gc", "--dry-run"])
    assert json.loads(res.output)["leftovers"] == {"work_dirs": 2, "failed_logs": 5, "agent_sockets": 1}
    assert _left(base, agents, store) == before
    res = CliRunner().invoke(cli, ["--store", store, "--json", "gc"])
    assert res.exit_code == 0, res.output
    assert len(_left(base, agents, store)) == len(before) - 8
