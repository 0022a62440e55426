"""sysrun.run: an interrupt waits for the child instead of killing it; a timeout kills it."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from gpusnap import sysrun


def test_ctrl_c_lets_the_child_finish_then_is_raised(tmp_path):
    done = tmp_path / "done"
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        sysrun.run(["sh", "-c", f"sleep 0.6; touch {done}"])
    assert done.exists(), "the child ran to its end"
    assert time.monotonic() - start >= 0.6


def interrupted_at_the_start(monkeypatch):
    """A Ctrl-C that lands while the child is being started (fork done, exec awaited):
    Popen returns into a KeyboardInterrupt. The list of the children started."""
    real, started = subprocess.Popen, []

    def popen(*args, **kwargs):
        started.append(real(*args, **kwargs))
        os.kill(os.getpid(), signal.SIGINT)
        return started[-1]
    monkeypatch.setattr(sysrun.subprocess, "Popen", popen)
    return started


def test_ctrl_c_while_the_child_starts_still_waits_for_it(tmp_path, monkeypatch):
    """Else a CRIU dump goes on after gpusnap's undo resumed the tree, and leaves it
    stopped; or a CRIU restore, after the undo looked for the tree to kill."""
    interrupted_at_the_start(monkeypatch)
    done = tmp_path / "done"
    with pytest.raises(KeyboardInterrupt):
        sysrun.run(["sh", "-c", f"sleep 0.3; touch {done}"])
    assert done.exists(), "the child ran to its end before the interrupt was raised"


def test_timeout_still_kills_the_child(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        sysrun.run(["sh", "-c", f"sleep 5; touch {tmp_path / 'late'}"], timeout=0.3)
    time.sleep(0.2)
    assert not (tmp_path / "late").exists()


def test_output_and_exit_code():
    res = sysrun.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")


def test_die_with_parent_signals_at_once_when_that_parent_is_gone_already():
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(7))
        sysrun.die_with_parent(signal.SIGTERM, parent=os.getppid() + 1)     # not its parent
        os._exit(0)
    assert os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 7
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(7))
        sysrun.die_with_parent(signal.SIGTERM, parent=os.getppid())
        os._exit(0)
    assert os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 0


def _ignored(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)


def test_the_child_ignores_sigint_from_its_exec_on_with_no_python_in_between():
    """The disposition is set by a trampoline that execs the program in its place (no
    preexec_fn: Python in a child forked beside threads can hang on a lock one held)."""
    running = sysrun.begin(["sleep", "5"])
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{running.pid}/exe").endswith("sh"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert _ignored(running.pid) & (1 << (signal.SIGINT - 1))
        assert open(f"/proc/{running.pid}/cmdline").read().split("\0")[:2] == [
            sysrun.shutil.which("sleep"), "5"]
        os.kill(running.pid, signal.SIGINT)
        assert running.exit_code(0.3) is None, "SIGINT ignored"
    finally:
        running.proc.kill()
        running.wait()


@pytest.mark.parametrize("program, error", [
    ("gpusnap-no-such-program", FileNotFoundError),
    ("./no-such-file", FileNotFoundError),
    ("./not-executable", PermissionError),
])
def test_a_program_that_cannot_run_raises_as_popen_would(program, error, tmp_path):
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    (tmp_path / "not-executable").chmod(0o644)
    with pytest.raises(error):
        sysrun.begin([program], cwd=str(tmp_path))


def test_a_relative_program_runs_from_cwd(tmp_path):
    script = tmp_path / "hello"
    script.write_text("#!/bin/sh\necho hello \"$@\"\n")
    script.chmod(0o755)
    assert sysrun.run(["./hello", "a b"], cwd=str(tmp_path)).stdout == "hello a b\n"
