"""The CRIU action script's guard (gpusnap.criu.hook) for real: a detached process that
must come up, hold the state, and wait for CRIU and the pre-dump hook, whatever stops
them. CRIU is a stand-in process here (what the guard sees of CRIU is its pid); the
CUDA side is the unit tests' fake driver in the hook's own process. The guard itself
runs the real module, so where it reaches CUDA (no GPU here) it logs that it tried.

Root only: the hook's state directory is /run/gpusnap-hook, its config
/etc/gpusnap/config.yaml (put back afterwards).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time

import pytest
from conftest import hook_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the hook's state dir is root's")]


@pytest.fixture
def log(tmp_path):
    """The hook and its guard log to a file of this test."""
    path = tmp_path / "hook.log"
    with hook_config(f"log: {path}\n"):
        yield path


def _text(path) -> str:
    return path.read_text() if path.exists() else ""


def _wait_for(fn, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _guards(state: str) -> list[int]:
    """Pids of guard processes started for this state file."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"--guard" in argv and state.encode() in argv:
                found.append(int(name))
    return found


@pytest.fixture
def guards():
    """Kills, at the end, the guards a test's state files started (by pid)."""
    states: list[str] = []
    yield states
    for state in states:
        for pid in _guards(state):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        try:
            os.unlink(state)
        except FileNotFoundError:
            pass


def _node_python(tmp_path) -> str:
    """A Python with gpusnap's dependencies but without gpusnap, as on a node prepared by
    examples/kubernetes/install-node.sh (the hook script adds gpusnap's source to its
    path). The dependencies come through a .pth naming this environment's site, whose
    own .pth files (the checkout's editable install) are not run (test_hook_from_wheel)."""
    venv = tmp_path / "node-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-I", "-c",
                           "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "zz-test-deps.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")
    assert subprocess.run([python, "-I", "-c", "import gpusnap"], cwd="/",
                          capture_output=True).returncode != 0
    return python


def test_guard_runs_where_gpusnap_comes_from_the_hook_scripts_source_path(log, guards, tmp_path):
    """render_script(python, source): the hook finds gpusnap through the path its script
    adds, and so must the guard it starts (it did `python -I -m gpusnap.criu.hook`, which
    could not import gpusnap there: it died at once, and a --leave-running dump left CUDA
    checkpointed for good)."""
    from gpusnap.criu import hook as h
    from gpusnap.criu.hook_install import render_script
    python = _node_python(tmp_path)
    criu = subprocess.Popen(["sleep", "1"])
    try:
        state = h.state_path(criu.pid)
        guards.append(state)
        h.write_state(state, {"criu": criu.pid, "init": 999999, "pids": {"999999": 12345},
                              "initial": {"999999": "RUNNING"}})
        script = render_script(python, REPO).replace(
            "from gpusnap.criu.hook import main  # noqa: E402\n\nsys.exit(main())\n",
            f"from gpusnap.criu import hook\nhook.spawn_guard({state!r}, {criu.pid})\n")
        assert "spawn_guard" in script
        res = subprocess.run([python, "-I", "-c", script], cwd="/", capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        criu.wait()
        _wait_for(lambda: "nothing to undo" in _text(log))
        assert "FAILED" not in _text(log)
        assert not os.path.exists(state)
    finally:
        if criu.poll() is None:
            criu.kill()
            criu.wait()


# pre-dump in a process of its own, as CRIU runs it, with CRIU's pid given and a fake
# driver whose checkpoint marks the file MARK and then hangs (where the test kills it)
PRE_DUMP = """
import sys, time, types
sys.path.insert(0, sys.argv[1])
from gpusnap.criu import hook
from gpusnap.cuda.driver import CudaState
from gpusnap.cuda.session import CudaSession
criu, target, mark = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

class Driver:
    states = {target: CudaState.RUNNING}
    def get_state(self, pid):
        return self.states[pid]
    def lock(self, pid, timeout_ms=0):
        self.states[pid] = CudaState.LOCKED
    def checkpoint(self, pid):
        open(mark, "w").close()
        time.sleep(600)

driver = Driver()
hook._cuda = lambda: types.SimpleNamespace(
    CudaState=CudaState, get_driver=lambda: driver, cuda_pids=lambda pids, d=None: list(pids),
    CudaSession=lambda pids, d=None, **thp: CudaSession(pids, driver, huge_pages=False))
hook.tree_pids = lambda init: [target]
hook.holds_nvidia_fd = lambda pid: True
hook.criu_pid = lambda: criu
sys.exit(hook.pre_dump(target, {}, hook.Log(hook.load_config()[0]["log"], "pre-dump")))
"""


@pytest.fixture
def pre_dump(guards, tmp_path):
    """start(criu): PRE_DUMP run for a new process standing in for the container's CUDA
    process, with CRIU's pid criu; (the hook's Popen, the target's, the mark, the state
    file's path). Every process started here is killed at the end."""
    from gpusnap.criu import hook as h
    procs = []

    def start(criu: int):
        target = subprocess.Popen(["sleep", "600"])
        procs.append(target)
        mark = tmp_path / "checkpointing"
        proc = subprocess.Popen([sys.executable, "-c", PRE_DUMP, REPO, str(criu),
                                 str(target.pid), str(mark)], cwd="/")
        procs.append(proc)
        state = f"{h.STATE_DIR}/{criu}-{h.starttime(criu) or 0}.json"
        guards.append(state)
        return proc, target, mark, state

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_guard_is_up_before_the_first_lock_and_waits_for_criu_and_the_hook(log, pre_dump):
    """pre-dump killed with SIGKILL in the middle of the CUDA checkpoint (the process
    locked: nothing of it will undo that), CRIU killed too: the guard was started before
    the lock, and once both are gone it restores the process, which outlived them. (It
    used to start only after the checkpoint: a hook killed before that left the process
    locked for good.) No GPU here: the guard's try shows in the log as a CUDA failure."""
    criu = subprocess.Popen(["sleep", "600"])
    try:
        proc, target, mark, state = pre_dump(criu.pid)
        _wait_for(lambda: mark.exists() or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, _text(log)
        assert _guards(state), "a guard is up while the process is locked"
        assert os.path.exists(state)
        criu.kill()
        criu.wait()
        time.sleep(0.5)
        assert "guard:" not in _text(log), "the guard waits for the hook too"
        proc.kill()
        proc.wait()
        _wait_for(lambda: "guard:" in _text(log))
        assert f"guard: restoring CUDA for [{target.pid}]" in _text(log), _text(log)
        _wait_for(lambda: not _guards(state))
        assert not os.path.exists(state)
    finally:
        if criu.poll() is None:
            criu.kill()
            criu.wait()


def test_pre_dump_after_criu_has_gone_locks_nothing_and_fails(log, pre_dump):
    """CRIU killed and reaped before pre-dump got to its guard (CRIU's pid names nobody,
    or another process): pre-dump must lock nothing and exit 1. It used to go on: the
    guard, with no pidfd of CRIU to poll, watched the pid's start time for a change
    that never came, for 6 hours, while the tree it locked ran on locked."""
    criu = subprocess.Popen(["true"])
    criu.wait()
    proc, target, mark, state = pre_dump(criu.pid)
    assert proc.wait(timeout=30) == 1
    assert not mark.exists(), "nothing was locked"
    assert f"criu {criu.pid} has exited" in _text(log), _text(log)
    assert not _guards(state) and not os.path.exists(state)


def test_a_fifo_at_the_log_path_does_not_hang_the_hook(tmp_path):
    """The log is opened O_NOFOLLOW (a link there is refused); a FIFO there, which whoever
    can write the log's directory can leave, blocked the open for good: every action hung
    (pre-dump after its lock, with CRIU and the guard waiting on it). The hook goes on
    without its log line."""
    fifo = tmp_path / "hook.log"
    os.mkfifo(fifo)
    env = {"PATH": "/usr/bin:/bin", "CRTOOLS_SCRIPT_ACTION": "post-dump",
           "CRTOOLS_INIT_PID": str(os.getpid())}
    with hook_config(f"log: {fifo}\n"):
        res = subprocess.run([sys.executable, "-c",
                              "import sys\nsys.path.insert(0, sys.argv[1])\n"
                              "from gpusnap.criu.hook import main\nsys.exit(main())", REPO],
                             env=env, cwd="/", capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
