"""The CRIU action script (gpusnap.criu.hook) and `gpusnap hooks install`, without
CRIU or a GPU: the CUDA side is a fake that follows the driver's state transitions."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import types

import pytest

from gpusnap.criu import hook_install
from gpusnap.errors import InsecureStore
from gpusnap.cuda.driver import CudaState
from gpusnap.cuda.session import CudaSession
from gpusnap.errors import CudaFailed

R, L, C = CudaState.RUNNING, CudaState.LOCKED, CudaState.CHECKPOINTED


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="installs into root-owned directories")


def load_hook():
    return importlib.import_module("gpusnap.criu.hook")


class FakeDriver:
    MOVES = {"lock": (R, L), "checkpoint": (L, C), "restore": (C, L), "unlock": (L, R)}

    def __init__(self, states, fail=None):
        self.states, self.fail, self.calls = dict(states), set(fail or ()), []

    def get_state(self, pid):
        if pid not in self.states:
            raise CudaFailed(f"pid {pid} has no CUDA")
        return self.states[pid]

    def _op(self, op, pid, *args):
        self.calls.append((op, pid, *args))
        if (op, pid) in self.fail:
            raise CudaFailed(f"{op} failed on {pid}")
        src, dst = self.MOVES[op]
        assert self.states[pid] == src, (op, pid, self.states[pid])
        self.states[pid] = dst

    def init(self):
        return 0                        # cuInit succeeded

    def error_name(self, code):
        return f"CUDA_ERROR_{code}"

    def lock(self, pid, timeout_ms=0):
        self._op("lock", pid)

    def checkpoint(self, pid):
        self._op("checkpoint", pid)

    def restore(self, pid, pairs=None):
        self._op("restore", pid, pairs)

    def unlock(self, pid):
        self._op("unlock", pid)


def fake_cuda(driver):
    return types.SimpleNamespace(
        CudaState=CudaState, get_driver=lambda: driver,
        CudaSession=lambda pids, d=None, **thp: CudaSession(pids, driver, huge_pages=False),
        cuda_pids=lambda pids, d=None: [p for p in pids if p in driver.states])


@pytest.fixture
def hook(tmp_path, monkeypatch):
    h = load_hook()
    monkeypatch.setattr(h, "STATE_DIR", str(tmp_path / "state"))
    lines = []
    h.log_lines = lines
    h.test_log = lines.append
    return h


# ---- config -----------------------------------------------------------------------------

def test_config_is_yaml_checked():
    text = """# gpusnap
log: /var/log/x.log   # trailing comment
lock_timeout_ms: 2500
remap:
  GPU-aaa: GPU-bbb
  "GPU-ccc": 'GPU-ddd'
"""
    h = load_hook()
    assert h.parse_config(text) == {"log": "/var/log/x.log", "lock_timeout_ms": 2500,
                                    "remap": {"GPU-aaa": "GPU-bbb", "GPU-ccc": "GPU-ddd"}}
    assert h.parse_config("remap: {GPU-a: GPU-b, GPU-c: GPU-d}\n")["remap"] == {
        "GPU-a": "GPU-b", "GPU-c": "GPU-d"}
    assert h.parse_config("remap: {}\n") == {"remap": {}}
    assert h.parse_config("") == {}
    assert h.parse_config("huge_pages: off\n") == {"huge_pages": False}     # YAML's off
    assert h.parse_config("huge_pages: auto\n") == {"huge_pages": "auto"}
    for bad in ("  indented: first\nx: [\n", "just words\n", "remap: GPU-a\n",
                "lock_timeout_ms: soon\n", "log: relative.log\n", "remap: {a: [b]}\n",
                "huge_pages: sometimes\n"):
        with pytest.raises(h.HookError):
            h.parse_config(bad)


def test_config_file_must_be_root_owned_and_private(tmp_path):
    h = load_hook()
    path = tmp_path / "config.yaml"
    assert h.load_config(str(path)) == ({}, None)
    path.write_text("log: /tmp/x.log\n")
    os.chmod(path, 0o644)
    cfg, err = h.load_config(str(path))
    if os.geteuid() == 0:
        assert cfg == {"log": "/tmp/x.log"} and err is None
    os.chmod(path, 0o666)
    assert "writable" in h.load_config(str(path))[1] or "owned" in h.load_config(str(path))[1]
    os.chmod(path, 0o644)
    path.write_text("log: relative.log\n")
    if os.geteuid() == 0:
        assert "absolute" in h.load_config(str(path))[1]


def test_init_pid_is_validated():
    h = load_hook()
    for bad in (None, "", "1", "0", "12; rm -rf /", "-5", "0x10", "99999999999", " 42"):
        with pytest.raises(h.HookError):
            h.parse_pid(bad, "CRTOOLS_INIT_PID")
    assert h.parse_pid(str(os.getpid()), "CRTOOLS_INIT_PID") == os.getpid()


def test_tree_of_this_process_includes_a_child():
    import subprocess
    h = load_hook()
    child = subprocess.Popen(["sleep", "5"])
    try:
        assert child.pid in h.tree_pids(os.getpid())
        assert h.tree_pids(child.pid) == [child.pid]
    finally:
        child.kill()
        child.wait()


# ---- actions, with the fake driver --------------------------------------------------------

def _setup(hook, monkeypatch, driver, tree):
    monkeypatch.setattr(hook, "_cuda", lambda: fake_cuda(driver))
    monkeypatch.setattr(hook, "tree_pids", lambda init: list(tree))
    monkeypatch.setattr(hook, "holds_nvidia_fd", lambda pid: pid in driver.states
                        and driver.states[pid] != C)
    monkeypatch.setattr(hook, "touches_nvidia", lambda pid: pid in driver.states)
    monkeypatch.setattr(hook, "criu_pid", lambda: 4242)
    monkeypatch.setattr(hook, "starttime", lambda pid: 1000 + pid)
    spawned = []
    monkeypatch.setattr(hook, "spawn_guard",
                        lambda path, criu, start=None: spawned.append((path, criu)))
    return spawned


def test_pre_dump_checkpoints_running_pids_skips_checkpointed_ones(hook, monkeypatch):
    driver = FakeDriver({11: R, 12: C})           # 12: gpusnap already checkpointed it
    spawned = _setup(hook, monkeypatch, driver, [10, 11, 12, 13])
    assert hook.pre_dump(10, {}, hook.test_log) == 0
    assert driver.states == {11: C, 12: C}
    assert [c[:2] for c in driver.calls] == [("lock", 11), ("checkpoint", 11)]
    (path, criu), = spawned
    state = json.load(open(path))
    assert criu == 4242 and state["initial"] == {"11": "RUNNING"}
    assert "locked and checkpointed [11]" in hook.log_lines[-1]


def test_pre_dump_without_cuda_does_not_load_it(hook, monkeypatch):
    monkeypatch.setattr(hook, "_cuda", lambda: pytest.fail("libcuda must not be loaded"))
    monkeypatch.setattr(hook, "tree_pids", lambda init: [10, 11])
    monkeypatch.setattr(hook, "holds_nvidia_fd", lambda pid: False)
    assert hook.pre_dump(10, {}, hook.test_log) == 0
    assert "nothing to do" in hook.log_lines[-1]


def test_pre_dump_failure_rolls_back_and_fails_closed(hook, monkeypatch):
    driver = FakeDriver({11: R, 12: R}, fail={("checkpoint", 12)})
    spawned = _setup(hook, monkeypatch, driver, [11, 12])
    assert hook.pre_dump(11, {}, hook.test_log) == 1
    assert driver.states == {11: R, 12: R}, "every pid back where it started"
    (path, criu), = spawned                 # started before the first lock: it stays
    assert json.load(open(path))["initial"] == {"11": "RUNNING", "12": "RUNNING"}
    assert "FAILED, dump aborted" in hook.log_lines[-1]


def test_pre_dump_fails_closed_when_its_guard_does_not_come_up(hook, monkeypatch):
    """The real guard, started for real, refusing the state file (this test's state dir is
    not the one it trusts): pre-dump must not lock anything, must fail and must leave no
    state file (it went on with no guard at all, and the dump with it)."""
    import subprocess
    driver = FakeDriver({11: R})
    # the real starttime and spawn_guard, and a live stand-in for CRIU
    monkeypatch.setattr(hook, "_cuda", lambda: fake_cuda(driver))
    monkeypatch.setattr(hook, "tree_pids", lambda init: [11])
    monkeypatch.setattr(hook, "holds_nvidia_fd", lambda pid: True)
    criu = subprocess.Popen(["sleep", "30"])
    monkeypatch.setattr(hook, "criu_pid", lambda: criu.pid)
    try:
        assert hook.pre_dump(11, {}, hook.test_log) == 1
    finally:
        criu.kill()
        criu.wait()
    assert driver.calls == [] and driver.states == {11: R}
    assert os.listdir(hook.STATE_DIR) == []
    assert "did not come up" in hook.log_lines[-1]


def test_guard_undoes_what_pre_dump_did_when_the_processes_survive(hook, monkeypatch):
    driver = FakeDriver({11: R, 12: C})
    spawned = _setup(hook, monkeypatch, driver, [11, 12])
    hook.pre_dump(11, {}, hook.test_log)
    path, criu = spawned[0]
    monkeypatch.setattr(hook, "wait_exit", lambda *a: True)
    assert hook.guard(path, criu, -1, 0, -1, -1, {}, hook.test_log) == 0
    assert driver.states == {11: R, 12: C}, "12 was not ours to restore"
    assert not os.path.exists(path)
    assert "CUDA restored and unlocked" in hook.log_lines[-1]


def test_guard_leaves_killed_processes_alone(hook, monkeypatch):
    driver = FakeDriver({11: R})
    spawned = _setup(hook, monkeypatch, driver, [11])
    hook.pre_dump(11, {}, hook.test_log)
    path, criu = spawned[0]
    monkeypatch.setattr(hook, "wait_exit", lambda *a: True)
    monkeypatch.setattr(hook, "starttime", lambda pid: None)       # gone: the dump killed it
    assert hook.guard(path, criu, -1, 0, -1, -1, {}, hook.test_log) == 0
    assert driver.states == {11: C} and [c[0] for c in driver.calls] == ["lock", "checkpoint"]


def test_guard_refuses_a_state_file_elsewhere(hook, tmp_path):
    assert hook.guard(str(tmp_path / "x.json"), 1, -1, 0, -1, -1, {}, hook.test_log) == 2


def test_guard_without_pidfds_sees_a_process_gone_before_it_looked(hook):
    """Without pidfds (kernels before 5.3) the guard watches start times: a CRIU that
    had exited before the guard first looked (start time None) counts as exited (it
    was waited for until the timeout, 6 hours)."""
    import subprocess
    import time
    gone = subprocess.Popen(["true"])
    gone.wait()
    started = time.monotonic()
    assert hook.wait_exit(gone.pid, hook.starttime(gone.pid), -1, 5) is True
    assert time.monotonic() - started < 1


def test_stale_state_files_go_with_their_temp_files(hook):
    """A hook killed while it wrote its state file leaves the temp file: it goes with the
    run's state files once that CRIU is gone (it stayed in /run/gpusnap-hook for good)."""
    import subprocess
    gone = subprocess.Popen(["true"])
    gone.wait()
    d = hook.secure_state_dir()
    live = f"{os.getpid()}-{hook.starttime(os.getpid())}.json"
    kept = [live, f"{live}.tmp-77-00ff00ff", "unrelated"]
    for name in kept + [f"{gone.pid}-123.json", f"{gone.pid}-123.json.tmp-{gone.pid}-0a1b2c3d"]:
        open(os.path.join(d, name), "w").close()
    hook.clean_stale_states()
    assert sorted(os.listdir(d)) == sorted(kept)


def test_post_resume_restores_with_the_configured_remap(hook, monkeypatch):
    driver = FakeDriver({21: C, 22: R})
    _setup(hook, monkeypatch, driver, [20, 21, 22])
    cfg = {"remap": {"GPU-a": "GPU-b"}}
    assert hook.post_resume(20, cfg, hook.test_log) == 0
    assert driver.states == {21: R, 22: R}
    assert ("restore", 21, [("GPU-a", "GPU-b")]) in driver.calls


def test_post_resume_failure_kills_the_restored_tree(hook, monkeypatch):
    """A tree whose CUDA state did not come back would hang in its first CUDA call while
    the engine shows it running: it is killed, and the hook says why."""
    driver = FakeDriver({21: C, 22: C}, fail={("restore", 22)})
    _setup(hook, monkeypatch, driver, [20, 21, 22])
    monkeypatch.setenv("GPUSNAP_CUDA_PARALLEL", "0")
    killed = []
    monkeypatch.setattr(hook.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    assert hook.post_resume(20, {"remap": {"GPU-a": "GPU-x"}}, hook.test_log) == 1
    assert killed == [(20, signal.SIGKILL), (21, signal.SIGKILL), (22, signal.SIGKILL)]
    assert "CUDA restore FAILED" in hook.log_lines[-1] and "killed (3 processes)" in hook.log_lines[-1]


def test_post_resume_leaves_gpusnap_restores_to_gpusnap(hook, monkeypatch, tmp_path):
    driver = FakeDriver({21: C})
    _setup(hook, monkeypatch, driver, [21])
    images = tmp_path / "images"
    images.mkdir()
    (images / hook.RESTORE_MARKER).write_text("snap nonce\n")
    monkeypatch.setenv("CRTOOLS_IMAGE_DIR", str(images))
    hook.pre_resume(21, hook.test_log)
    assert hook.post_resume(21, {}, hook.test_log) == 0
    assert driver.states == {21: C} and driver.calls == []
    assert "left to gpusnap" in hook.log_lines[-1]


def test_main_fails_closed_at_pre_dump_only(hook, monkeypatch):
    monkeypatch.setattr(hook, "load_config", lambda path=hook.CONFIG: ({"log": os.devnull}, None))
    env = {"CRTOOLS_SCRIPT_ACTION": "pre-dump", "CRTOOLS_INIT_PID": "not-a-pid"}
    monkeypatch.setattr(hook.os, "environ", env)
    assert hook.main(["hook"]) == 1
    env["CRTOOLS_SCRIPT_ACTION"] = "post-dump"
    assert hook.main(["hook"]) == 0
    env["CRTOOLS_SCRIPT_ACTION"] = "no-such-action"
    assert hook.main(["hook"]) == 0


# ---- install / uninstall -------------------------------------------------------------------

@root_only
def test_install_is_idempotent_keeps_a_backup_and_uninstall_restores(tmp_path):
    conf = tmp_path / "criu" / "runc.conf"
    conf.parent.mkdir()
    conf.write_text("tcp-established\n")
    script = tmp_path / "lib" / "gpusnap-criu-hook"
    report = hook_install.install(str(conf), str(script))
    assert report["changed"] == [str(script), str(conf)]
    assert report["backup"] == str(conf) + ".bak"
    assert (tmp_path / "criu" / "runc.conf.bak").read_text() == "tcp-established\n"
    text = conf.read_text()
    assert text.startswith("tcp-established\n") and text.endswith(f"action-script {script}\n")
    body = script.read_text()
    assert body.startswith(f"#!{sys.executable} -I\n")
    assert "from gpusnap.criu.hook import main" in body
    assert REPO not in body.split("\n", 1)[1], "nothing of the source tree but the interpreter"
    assert os.stat(script).st_mode & 0o777 == 0o755
    again = hook_install.install(str(conf), str(script))
    assert again["changed"] == [] and again["backup"] is None
    assert hook_install.installed(str(conf), str(script))

    out = hook_install.uninstall(str(conf), str(script))
    assert conf.read_text() == "tcp-established\n" and not script.exists()
    assert out["changed"] == [str(conf), str(script)]


@root_only
def test_install_into_no_file_creates_it_and_uninstall_removes_it(tmp_path):
    conf, script = tmp_path / "new.conf", tmp_path / "hook"
    hook_install.install(str(conf), str(script))
    assert conf.read_text() == f"{hook_install.MARK}\naction-script {script}\n"
    hook_install.uninstall(str(conf), str(script))
    assert not conf.exists() and not script.exists()


@root_only
def test_uninstall_keeps_the_script_another_config_still_names(tmp_path):
    """install-node.sh puts the line in crun.conf too: taking it out of runc.conf alone
    must not delete what crun's checkpoints still run."""
    (tmp_path / "criu").mkdir()
    runc, crun = tmp_path / "criu" / "runc.conf", tmp_path / "criu" / "crun.conf"
    script = tmp_path / "lib" / "gpusnap-criu-hook"
    hook_install.install(str(runc), str(script))
    hook_install.install(str(crun), str(script))
    out = hook_install.uninstall(str(runc), str(script))
    assert script.exists() and out["still_named_by"] == [str(crun)]
    assert out["changed"] == [str(runc)]
    out = hook_install.uninstall(str(crun), str(script))
    assert not script.exists() and out["still_named_by"] == []


def test_an_existing_line_in_another_spelling_counts():
    text = 'action-script = "/usr/local/lib/gpusnap/gpusnap-criu-hook"\n'
    assert hook_install.add_line(text, hook_install.DEFAULT_SCRIPT) is None
    assert hook_install.remove_line(text, hook_install.DEFAULT_SCRIPT) == ""
    assert hook_install.add_line("action-script /other\n", hook_install.DEFAULT_SCRIPT) \
        .endswith(f"action-script {hook_install.DEFAULT_SCRIPT}\n")


@root_only
def test_install_refuses_directories_others_can_write(tmp_path):
    for mode in (0o777, 0o1777, 0o775):
        shared = tmp_path / f"shared-{mode:o}"
        shared.mkdir()
        os.chmod(shared, mode)
        with pytest.raises(InsecureStore):
            hook_install.install(str(tmp_path / "ok.conf"), str(shared / "hook"))
        with pytest.raises(InsecureStore):
            hook_install.install(str(shared / "runc.conf"), str(tmp_path / "hook"))
        assert os.listdir(shared) == []
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(InsecureStore):
        hook_install.install(str(theirs / "sub" / "runc.conf"), str(tmp_path / "hook"))
    assert not (theirs / "sub").exists()


@root_only
def test_install_replaces_links_never_writes_through_them_and_keeps_modes(tmp_path):
    conf, script = tmp_path / "runc.conf", tmp_path / "hook"
    conf.write_text("tcp-established\n")
    os.chmod(conf, 0o600)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "runc.conf.bak").symlink_to(victim)
    script.symlink_to(victim)
    hook_install.install(str(conf), str(script))
    assert victim.read_text() == "precious\n", "nothing written through a link"
    bak = tmp_path / "runc.conf.bak"
    assert not bak.is_symlink() and bak.read_text() == "tcp-established\n"
    assert not script.is_symlink() and os.stat(script).st_mode & 0o7777 == 0o755
    assert os.stat(conf).st_mode & 0o7777 == 0o600 == os.stat(bak).st_mode & 0o7777
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n], "no temp file left"


def test_hook_without_an_action_does_nothing(tmp_path):
    """What CRIU's action names do not cover exits 0 at once (no log, no state)."""
    import subprocess
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for extra in ({}, {"CRTOOLS_SCRIPT_ACTION": "no-such-action"}):
        res = subprocess.run([sys.executable, "-I", "-m", "gpusnap.criu.hook"],
                             env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout == res.stderr == "", res.stderr


@root_only
def test_install_refuses_a_python_that_cannot_import_gpusnap_isolated(tmp_path):
    from gpusnap.errors import UsageError
    with pytest.raises(UsageError, match="cannot"):
        hook_install.install(str(tmp_path / "c.conf"), str(tmp_path / "h"), python="/bin/false")
    assert os.listdir(tmp_path) == []


@root_only
def test_install_that_cannot_write_the_config_leaves_no_script(tmp_path):
    """The config cannot be read or written (here: its path is a directory): install
    fails and takes back the script it had just written (it stayed, named by nothing)."""
    conf = tmp_path / "criu" / "runc.conf"
    conf.mkdir(parents=True)
    script = tmp_path / "lib" / "gpusnap-criu-hook"
    with pytest.raises(OSError):
        hook_install.install(str(conf), str(script))
    assert not script.exists() and os.listdir(script.parent) == []
    script.write_text("#!/bin/sh\n# the user's own\n")      # one that was there stays
    with pytest.raises(OSError):
        hook_install.install(str(conf), str(script))
    assert script.exists()
