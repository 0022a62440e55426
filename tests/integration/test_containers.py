"""Real docker and podman containers: gpusnap dump -> restore keeps in-memory state, and
the CRIU action script runs under docker, podman and runc checkpoints.

The workload is a busybox shell whose counter lives only in a shell variable; it
publishes it to /tmp/c (write then rename, so a reader never sees a half-written file).
After a restore the counter goes on from where it was; a container started afresh would
count from 1 again.

A session fixture runs scripts/setup-containers.sh (idempotent: about a second once the
host is ready, a minute on a fresh Debian 12). Only a non-root run is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from conftest import hook_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.containers]

IMAGE = "localhost/gpusnap-busybox:latest"
WORKLOAD = "i=0; while :; do i=$((i+1)); echo $i >/tmp/c.t; mv /tmp/c.t /tmp/c; sleep 0.1; done"
ENV = {**os.environ, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:"
       + os.environ.get("PATH", "")}
RUNC_CONF = "/etc/criu/runc.conf"
HOOK_SCRIPT = "/usr/local/lib/gpusnap/gpusnap-criu-hook"
ENGINES = ["docker", "podman"]


def sh(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, env=ENV, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
    return res


@pytest.fixture(scope="session")
def container_host():
    if os.geteuid() != 0:
        pytest.skip("container tests need root")
    start = time.monotonic()
    res = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup-containers.sh"),
                          "--no-python-image"], capture_output=True, text=True, env=ENV,
                         timeout=1800)
    assert res.returncode == 0, f"setup-containers.sh failed:\n{res.stdout}\n{res.stderr}"
    yield {"setup_s": time.monotonic() - start}
    _clean_containerd_restore_copies()


def _clean_containerd_restore_copies():
    """containerd 1.6 never deletes its copy of the images made for a docker restore."""
    for base in ("/var/lib/containerd/tmp", "/tmp"):
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            if name.startswith("ctrd-checkpoint"):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)


class Box:
    """One engine's view for a test: start containers, read their counters, clean up."""

    def __init__(self, engine: str):
        self.engine = engine
        self.names: list[str] = []

    def name(self) -> str:
        n = f"gs-{uuid.uuid4().hex[:8]}"
        self.names.append(n)
        return n

    def run(self, *extra: str, annotation: str | None = None) -> str:
        name = self.name()
        args = [self.engine, "run", "-d", "--name", name, *extra]
        if annotation:
            args += ["--annotation", annotation]
        sh(*args, IMAGE, "sh", "-c", WORKLOAD)
        self.wait_counter(name, 15)
        return name

    def inspect(self, name: str) -> dict:
        return json.loads(sh(self.engine, "inspect", name).stdout)[0]

    def running(self, name: str) -> bool:
        return self.inspect(name)["State"]["Running"] is True

    def pid(self, name: str) -> int:
        return int(self.inspect(name)["State"]["Pid"])

    def id(self, name: str) -> str:
        return self.inspect(name)["Id"]

    def counter(self, name: str) -> int:
        for _ in range(50):
            res = sh(self.engine, "exec", name, "cat", "/tmp/c", check=False)
            if res.returncode == 0 and res.stdout.strip().isdigit():
                return int(res.stdout)
            time.sleep(0.05)
        raise AssertionError(f"no counter in {name}: {res.stderr}")

    def wait_counter(self, name: str, at_least: int, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while True:
            value = self.counter(name)
            if value >= at_least or time.monotonic() > deadline:
                assert value >= at_least, f"{name}: counter {value} < {at_least}"
                return value
            time.sleep(0.1)

    def wait_stopped(self, name: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.running(name):
            assert time.monotonic() < deadline, f"{name} did not stop"
            time.sleep(0.05)

    def exec(self, name: str, script: str) -> str:
        return sh(self.engine, "exec", name, "sh", "-c", script).stdout

    def cleanup(self) -> None:
        for n in self.names:
            if self.engine == "docker":
                sh("docker", "rm", "-f", n, check=False)
            else:
                sh("podman", "rm", "-f", "-t", "0", n, check=False)
        if self.engine == "docker":
            _clean_containerd_restore_copies()


@pytest.fixture(params=ENGINES)
def box(request, container_host):
    b = Box(request.param)
    yield b
    b.cleanup()


def _restored(out: dict) -> str:
    assert set(out["container"]) >= {"engine", "id", "name"}, out
    return out["container"]["name"]


# ---- gpusnap dump / restore ------------------------------------------------------------

def test_dump_stops_the_container_and_restore_continues_its_counter(box, gpusnap):
    name = box.run()
    cid = box.id(name)
    rc, snap, err = gpusnap("dump", name, "--engine", box.engine, "--name", "keep")
    assert rc == 0, err
    box.wait_stopped(name)
    rc, out, err = gpusnap("restore", "keep")
    assert rc == 0, err
    assert _restored(out) == name and out["container"]["id"] == cid, "restored into itself"
    assert out["container"]["engine"] == box.engine
    assert out["pid"] == box.pid(name) and box.running(name)
    after = box.counter(name)
    assert after >= 15, f"counter restarted: {after} (state was not restored)"
    later = box.wait_counter(name, after + 3)
    assert later > after, "the restored container keeps counting"


def test_seed_add_container_finds_its_weights_inside_its_own_root(box, gpusnap, tmp_path):
    """`seed add --container`: the path on the container's command line is looked up in
    the container's root (its bind mount of the model), and a symlink there that names a
    host path resolves inside the container, not to the host's file."""
    from conftest import make_weights
    models = tmp_path / "models"
    models.mkdir()
    model = make_weights(str(models / "model.safetensors"), 2)
    hour_ago = os.stat(model).st_mtime - 3600       # landed before: its seed is found again
    os.utime(model, (hour_ago, hour_ago))
    host_only = make_weights(str(tmp_path / "host-only.safetensors"), 2)
    os.symlink(host_only, models / "escape.safetensors")       # a host path, absent inside
    name = box.name()
    sh(box.engine, "run", "-d", "--name", name, "-v", f"{models}:/models:ro", IMAGE,
       "sh", "-c", "sleep 3600; true", "/models")               # $0: on sh's command line
    rc, seed, err = gpusnap("seed", "add", "--container", name, "--engine", box.engine)
    assert rc == 0, err
    assert seed["files"] == ["/models/model.safetensors"] and seed["reused"] is False, seed
    assert seed["bytes_seeded"] > 1 << 20, seed
    # a dump of the container with --seed auto finds the same files (the engine's own
    # checkpoint, staged): that seed again, not read
    rc, snap, err = gpusnap("dump", name, "--engine", box.engine, "--leave-running",
                            "--seed", "auto")
    assert rc == 0, err
    assert snap["seed"]["sources"] == ["/models/model.safetensors"], snap
    assert snap["seed"]["reused"] is True and snap["seed"]["id"] == seed["id"], snap


def test_counter_goes_on_from_the_dumped_value(box, gpusnap):
    """A counter read just before the dump bounds it from below after the restore."""
    name = box.run()
    seen = box.wait_counter(name, 20)
    rc, snap, err = gpusnap("dump", name)                    # engine detected
    assert rc == 0, err
    box.wait_stopped(name)
    rc, out, err = gpusnap("restore", snap["id"])
    assert rc == 0, err
    assert box.counter(name) >= seen


def test_restore_under_a_new_name_leaves_the_original_stopped(box, gpusnap):
    name = box.run()
    seen = box.wait_counter(name, 20)
    rc, snap, err = gpusnap("dump", name, "--name", "copyme")
    assert rc == 0, err
    box.wait_stopped(name)
    new = box.name()
    rc, out, err = gpusnap("restore", "copyme", "--name", new)
    assert rc == 0, err
    assert _restored(out) == new and out["container"]["id"] != box.id(name)
    assert box.running(new) and not box.running(name)
    assert box.counter(new) >= seen
    # the snapshot stays restorable into the original as well
    rc, out, err = gpusnap("restore", "copyme")
    assert rc == 0, err
    assert _restored(out) == name and box.counter(name) >= seen


def test_leave_running_keeps_the_original_counting(box, gpusnap):
    name = box.run()
    pid = box.pid(name)
    seen = box.wait_counter(name, 20)
    rc, snap, err = gpusnap("dump", name, "--leave-running", "--name", "live")
    assert rc == 0, err
    assert box.running(name) and box.pid(name) == pid
    box.wait_counter(name, seen + 5)

    rc, out, err = gpusnap("restore", "live")
    assert rc == 6, err                                     # the original is still there
    assert out["error"] == "PidInUse"

    copy = box.name()
    rc, out, err = gpusnap("restore", "live", "--name", copy)
    assert rc == 0, err
    assert box.running(copy) and box.running(name)
    assert seen <= box.counter(copy)
    assert box.counter(name) > seen


def test_device_is_swapped_in_a_new_container(box, gpusnap):
    """--device OLD:NEW (what --gpu does for /dev/nvidiaN): the new container gets host
    NEW under the path OLD had, in its config, its cgroup and the node CRIU restores."""
    name = box.run("--device", "/dev/null:/dev/gsdev")
    assert box.exec(name, "stat -c %t:%T /dev/gsdev").strip() == "1:3"
    rc, snap, err = gpusnap("dump", name, "--leave-running")
    assert rc == 0, err
    copy = box.name()
    rc, out, err = gpusnap("restore", snap["id"], "--name", copy, "--device", "/dev/null:/dev/zero")
    assert rc == 0, err
    assert any("/dev/zero" in n for n in out["notes"]), out
    assert box.exec(copy, "stat -c %t:%T /dev/gsdev").strip() == "1:5"
    assert box.exec(copy, "head -c 4 /dev/gsdev | od -An -tx1").split() == ["00"] * 4
    assert box.exec(name, "stat -c %t:%T /dev/gsdev").strip() == "1:3", "original untouched"

    rc, out, err = gpusnap("restore", snap["id"], "--name", box.name(),
                           "--device", "/dev/kmsg:/dev/zero")
    assert rc == 2 and "was not given /dev/kmsg" in err


def test_failed_ingest_brings_the_container_back_and_leaves_no_snapshot(box, store):
    """The engine has already stopped the container when the store fails: the undo
    starts it again from the images just taken (its counter goes on)."""
    from gpusnap.engine import dump
    from gpusnap.errors import StoreFull
    from gpusnap.store import Repository

    class FullRepository(Repository):
        def ingest_dir(self, src, progress=None):
            raise StoreFull("injected: no space left")

    name = box.run()
    seen = box.wait_counter(name, 20)
    repo = FullRepository.open(store)
    plan = dump.plan(dump.DumpRequest(container=name, engine=box.engine))
    with pytest.raises(StoreFull):
        dump.execute(plan, repo)
    assert box.running(name), "the container runs again"
    assert box.counter(name) >= seen, "from its checkpoint, not from scratch"
    assert repo.list() == []


@pytest.fixture
def runc_conf():
    """Lets a test write /etc/criu/runc.conf (read by runc for every docker/podman/runc
    checkpoint on this host) and puts back exactly what was there."""
    old = open(RUNC_CONF).read() if os.path.exists(RUNC_CONF) else None
    old_bak = open(RUNC_CONF + ".bak").read() if os.path.exists(RUNC_CONF + ".bak") else None
    yield RUNC_CONF
    for path, text in ((RUNC_CONF, old), (RUNC_CONF + ".bak", old_bak)):
        if text is None:
            if os.path.exists(path):
                os.unlink(path)
        else:
            with open(path, "w") as f:
                f.write(text)


BUSY_WRITER = ("i=0; while :; do i=$((i+1)); echo $i >/tmp/c.t; mv /tmp/c.t /tmp/c; "
               "echo $i $i $i $i $i $i $i $i >>/tmp/log; done")


def test_leave_running_dump_of_a_container_writing_files(box, gpusnap):
    """A container that writes files all the time (logs, say) is dumped --leave-running
    again and again: its rootfs changes are archived while it is frozen (docker: paused,
    then unpaused; podman: its own export), never read mid-write."""
    name = box.name()
    sh(box.engine, "run", "-d", "--name", name, IMAGE, "sh", "-c", BUSY_WRITER)
    box.wait_counter(name, 100)
    for _ in range(3):
        rc, snap, err = gpusnap("dump", name, "--leave-running")
        assert rc == 0, err
        state = box.inspect(name)["State"]
        assert state["Running"] and not state["Paused"], state
    seen = box.counter(name)
    box.wait_counter(name, seen + 100)


def test_dump_killed_while_the_container_is_paused_unpauses_it(box, gpusnap, store, tmp_path):
    """docker: gpusnap killed with SIGKILL while the container is paused for its rootfs
    archive: the guard unpauses it; no snapshot appears."""
    if box.engine != "docker":
        pytest.skip("podman archives the rootfs inside its own checkpoint")
    name = box.run()
    box.exec(name, "head -c 400000000 /dev/urandom >/tmp/big")     # a tar that takes a while
    env = {**os.environ, "GPUSNAP_STORE": store,
           "GPUSNAP_STATE_DIR": os.path.join(os.path.dirname(store), "state")}
    proc = subprocess.Popen([sys.executable, "-m", "gpusnap", "--json", "dump", name,
                             "--leave-running"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not box.inspect(name)["State"]["Paused"]:
            assert proc.poll() is None, "the dump ended before it paused the container"
            assert time.monotonic() < deadline, "the container was never paused"
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait()
    deadline = time.monotonic() + 30
    while box.inspect(name)["State"]["Paused"]:
        assert time.monotonic() < deadline, "the container was left paused"
        time.sleep(0.05)
    box.wait_counter(name, box.counter(name) + 3)
    assert gpusnap("ls")[1] == []


def test_failed_engine_checkpoint_keeps_the_container_running(box, gpusnap, runc_conf, tmp_path):
    """A CRIU action script that fails at pre-dump (as the gpusnap hook does when it
    cannot checkpoint CUDA) makes the engine's checkpoint fail: gpusnap exits 30, the
    container keeps running, no snapshot appears."""
    failing = tmp_path / "fail-pre-dump"
    failing.write_text('#!/bin/sh\n[ "$CRTOOLS_SCRIPT_ACTION" = pre-dump ] && exit 1\nexit 0\n')
    failing.chmod(0o755)
    os.makedirs(os.path.dirname(runc_conf), exist_ok=True)
    with open(runc_conf, "w") as f:
        f.write(f"action-script {failing}\n")
    name = box.run()
    pid = box.pid(name)
    rc, out, err = gpusnap("dump", name)
    assert rc == 30, err
    assert out["error"] == "ContainerEngineError"
    assert box.running(name) and box.pid(name) == pid
    box.wait_counter(name, box.counter(name) + 3)
    assert gpusnap("ls")[1] == []


# ---- the CRIU action script under the runtimes ------------------------------------------

DUMP_ACTIONS = ["pre-dump", "network-lock", "post-dump"]
RESTORE_ACTIONS = ["pre-restore", "setup-namespaces", "post-setup-namespaces", "post-restore",
                   "network-unlock", "pre-resume", "post-resume"]


@pytest.fixture
def hook(runc_conf, tmp_path):
    """gpusnap hooks install into the real runc.conf, logging to a file of this test
    (through /etc/gpusnap/config.yaml, put back afterwards)."""
    log = tmp_path / "hook.log"
    with hook_config(f"# test config\nlog: {log}\nremap: {{}}\n"):
        yield from _installed_hook(runc_conf, log)


def _installed_hook(runc_conf, log):
    had_script = os.path.exists(HOOK_SCRIPT)
    res = subprocess.run([sys.executable, "-m", "gpusnap", "--json", "hooks", "install"],
                         cwd=REPO, capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["config"] == runc_conf and os.access(HOOK_SCRIPT, os.X_OK)
    again = subprocess.run([sys.executable, "-m", "gpusnap", "--json", "hooks", "install"],
                           cwd=REPO, capture_output=True, text=True, env=ENV)
    assert json.loads(again.stdout)["changed"] == [], "install is idempotent"

    def actions() -> list[str]:
        if not log.exists():
            return []
        return [line.split()[1].split("=", 1)[1] for line in log.read_text().splitlines()
                if line.split()[1].startswith("action=")]

    yield {"log": log, "actions": actions}
    subprocess.run([sys.executable, "-m", "gpusnap", "hooks", "uninstall",
                    *([] if not had_script else ["--keep-script"])],
                   cwd=REPO, capture_output=True, text=True, env=ENV)


def _wait_for(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _docker_checkpoint_running(name: str, checkpoint: str) -> str:
    for attempt, delay in enumerate((0.5, 1, 2, None)):
        ck = checkpoint if attempt == 0 else f"{checkpoint}-{attempt}"
        res = sh("docker", "checkpoint", "create", "--leave-running", name, ck, check=False)
        if res.returncode == 0:
            return ck
        assert delay is not None and "already exists" in res.stderr, res.stderr
        time.sleep(delay)
    raise AssertionError("unreachable")


def test_hook_runs_under_docker_checkpoint_and_restore(container_host, hook):
    b = Box("docker")
    try:
        name = b.run()
        sh("docker", "checkpoint", "create", "--leave-running", name, "ck1")
        assert hook["actions"]() == DUMP_ACTIONS + ["network-unlock"]
        # moby#42900: containerd's content store may answer "content ... already exists" to a
        # checkpoint taken right after another (CI saw it here). Taken with --leave-running,
        # the container outlives that answer, so it is taken again under another name.
        ck = _docker_checkpoint_running(name, "ck2")
        assert hook["actions"]()[-4:] == DUMP_ACTIONS + ["network-unlock"]
        sh("docker", "kill", name)
        b.wait_stopped(name)
        seen = len(hook["actions"]())
        for delay in (0.5, 1, 2, None):       # moby#42900 again, on the way back
            res = sh("docker", "start", "--checkpoint", ck, name, check=False)
            if res.returncode == 0 or delay is None or "already exists" not in res.stderr:
                break
            time.sleep(delay)
        assert res.returncode == 0, res.stderr
        assert hook["actions"]()[seen:] == RESTORE_ACTIONS
        assert b.running(name)
        text = hook["log"].read_text()
        assert "no /dev/nvidia* in the tree" in text and "no CUDA in the tree" in text
    finally:
        b.cleanup()


def test_hook_runs_under_podman_and_leaves_gpusnap_restores_to_gpusnap(container_host, hook, gpusnap):
    b = Box("podman")
    try:
        name = b.run()
        sh("podman", "container", "checkpoint", name)
        sh("podman", "container", "restore", name)
        assert hook["actions"]() == DUMP_ACTIONS + RESTORE_ACTIONS
        assert b.running(name)
        rc, snap, err = gpusnap("dump", name)
        assert rc == 0, err
        rc, out, err = gpusnap("restore", snap["id"])
        assert rc == 0, err
        assert "gpusnap drives this restore" in hook["log"].read_text()
        assert "left to gpusnap" in hook["log"].read_text()
    finally:
        b.cleanup()


def _runc_bundle(path, config_file: str) -> None:
    rootfs = path / "rootfs"
    rootfs.mkdir(parents=True)
    sh("tar", "-C", str(rootfs), "-xf", "/var/cache/gpusnap/busybox-rootfs.tar")
    sh("runc", "spec", "--bundle", str(path))
    spec = json.loads((path / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sh", "-c", WORKLOAD]
    spec["root"]["readonly"] = False
    spec.setdefault("annotations", {})["org.criu.config"] = config_file
    (path / "config.json").write_text(json.dumps(spec))


def test_hook_runs_under_runc_through_the_annotation(container_host, tmp_path, gpusnap):
    """runc with a per-container CRIU config (org.criu.config), installed by
    `gpusnap hooks install --config` into a temp file: nothing global changes."""
    conf = tmp_path / "criu.conf"
    script = tmp_path / "hook" / "gpusnap-criu-hook"
    rc, out, err = gpusnap("hooks", "install", "--config", str(conf), "--script", str(script))
    assert rc == 0, err
    assert conf.read_text().strip().endswith(f"action-script {script}")
    log = "/var/log/gpusnap-hook.log"
    start = os.path.getsize(log) if os.path.exists(log) else 0
    bundle = tmp_path / "bundle"
    _runc_bundle(bundle, str(conf))
    cid = f"gs-{uuid.uuid4().hex[:8]}"
    images = tmp_path / "images"
    try:
        subprocess.run(["runc", "run", "-d", "--bundle", str(bundle), cid], env=ENV,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True, timeout=60)
        time.sleep(0.5)
        state = json.loads(sh("runc", "state", cid).stdout)
        init = state["pid"]
        sh("runc", "checkpoint", "--image-path", str(images), cid)
        subprocess.run(["runc", "restore", "-d", "--bundle", str(bundle), "--image-path",
                        str(images), cid], env=ENV, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       timeout=60)
        new = json.loads(sh("runc", "state", cid).stdout)["pid"]
        with open(log) as f:
            f.seek(start)
            lines = f.read().splitlines()
        dumped = [ln.split()[1][len("action="):] for ln in lines if f"init={init}" in ln]
        restored = [ln.split()[1][len("action="):] for ln in lines
                    if f"init={new}" in ln or "action=pre-restore" in ln]
        assert dumped == DUMP_ACTIONS, lines
        assert restored[-len(RESTORE_ACTIONS):] == RESTORE_ACTIONS, lines
    finally:
        sh("runc", "kill", cid, "KILL", check=False)
        time.sleep(0.2)
        sh("runc", "delete", "-f", cid, check=False)
    rc, out, err = gpusnap("hooks", "uninstall", "--config", str(conf), "--script", str(script))
    assert rc == 0 and not conf.exists() and not script.exists()


# An action script that runs the hook's guard for real at pre-dump, with the container's
# init as the process it would restore, and logs each action where the guard logs.
GUARD_PROBE = """#!{python} -I
import os, sys
sys.path.insert(0, {repo!r})
from gpusnap.criu import hook as h
action = os.environ.get("CRTOOLS_SCRIPT_ACTION", "")
h.Log(h.load_config()[0]["log"], action)("probe")
if action == "pre-dump":
    init = int(os.environ["CRTOOLS_INIT_PID"])
    criu = h.criu_pid()
    path = h.state_path(criu)
    h.write_state(path, {{"criu": criu, "init": init, "pids": {{str(init): h.starttime(init)}},
                         "initial": {{str(init): "RUNNING"}}}})
    h.spawn_guard(path, criu)
"""


def test_hook_guard_under_criu_waits_for_criu_to_exit(container_host, tmp_path):
    """Under runc's own CRIU, which runs action scripts with stdin closed: the guard's
    pidfd of CRIU was opened as fd 0, which the guard's start replaced with /dev/null;
    the guard saw CRIU "exit" at once and restored the container's CUDA while CRIU was
    still dumping it. Now it must act only once CRIU has exited: after a plain checkpoint
    it finds the container gone; after --leave-running it tries the restore (no GPU here:
    it logs a CUDA failure) only after the dump's last action."""
    log = tmp_path / "hook.log"
    probe = tmp_path / "probe"
    probe.write_text(GUARD_PROBE.format(python=sys.executable, repo=REPO))
    probe.chmod(0o755)
    conf = tmp_path / "criu.conf"
    conf.write_text(f"action-script {probe}\n")
    bundle = tmp_path / "bundle"
    _runc_bundle(bundle, str(conf))
    cid = f"gs-{uuid.uuid4().hex[:8]}"

    def guard_line() -> str:
        lines = log.read_text().splitlines() if log.exists() else []
        return next((ln for ln in lines if "action=guard" in ln), "")

    with hook_config(f"log: {log}\n"):
        try:
            subprocess.run(["runc", "run", "-d", "--bundle", str(bundle), cid], env=ENV,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True, timeout=60)
            time.sleep(0.5)
            init = json.loads(sh("runc", "state", cid).stdout)["pid"]
            sh("runc", "checkpoint", "--leave-running", "--image-path",
               str(tmp_path / "images1"), cid)
            _wait_for(guard_line)
            lines = log.read_text().splitlines()
            assert f"restoring CUDA for [{init}]" in guard_line(), lines
            last = max(i for i, ln in enumerate(lines) if "action=network-unlock" in ln)
            assert lines.index(guard_line()) > last, lines
            log.unlink()
            sh("runc", "checkpoint", "--image-path", str(tmp_path / "images2"), cid)
            _wait_for(guard_line)
            assert "nothing to undo" in guard_line(), log.read_text()
        finally:
            sh("runc", "kill", cid, "KILL", check=False)
            time.sleep(0.2)
            sh("runc", "delete", "-f", cid, check=False)


def test_hook_guard_waits_for_criu_then_looks_at_the_processes(container_host, hook):
    """The guard pre-dump leaves behind, for real (a detached run of the hook module, the
    CRIU pid and the hook's by pidfd), with a stand-in for CRIU, a pre-dump hook that has
    exited and a dumped process that is gone: it must wait for the stand-in to exit, then
    find nothing to undo (no CUDA needed)."""
    from gpusnap.criu import hook as h
    criu = subprocess.Popen(["sleep", "1"])
    try:
        state = h.state_path(criu.pid)
        h.write_state(state, {"criu": criu.pid, "init": 999999,
                              "pids": {"999999": 12345}, "initial": {"999999": "RUNNING"}})
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "import sys\nfrom gpusnap.criu import hook\n"
                        "hook.spawn_guard(sys.argv[1], int(sys.argv[2]))", state,
                        str(criu.pid)], cwd=REPO, check=True, timeout=60)
        time.sleep(0.3)
        assert "guard:" not in hook["log"].read_text() if hook["log"].exists() else True
        criu.wait()
        _wait_for(lambda: hook["log"].exists() and "nothing to undo" in hook["log"].read_text())
        assert time.monotonic() - started >= 0.9, "the guard waited for CRIU to exit"
        assert not os.path.exists(state), "the guard removes its state file"
    finally:
        if criu.poll() is None:
            criu.kill()


def test_ignore_rootfs_leaves_the_filesystem_changes_out(box, gpusnap):
    """--ignore-rootfs (podman's flag): no rootfs-diff.tar in the snapshot; a copy
    restored from it has the dumped memory but the image's filesystem."""
    name = box.run()
    box.exec(name, "echo kept >/marker")
    seen = box.wait_counter(name, 20)
    rc, snap, err = gpusnap("dump", name, "--engine", box.engine, "--ignore-rootfs",
                            "--leave-running")
    assert rc == 0, err
    assert any(n.startswith("--ignore-rootfs") for n in snap["notes"]), snap
    rc, info, err = gpusnap("inspect", snap["id"])
    assert rc == 0, err
    assert "rootfs-diff.tar" not in {f["path"] for f in info["files"]}
    assert info["target"]["container"]["rootfs_diff"] is False
    copy = box.name()
    rc, out, err = gpusnap("restore", snap["id"], "--name", copy)
    assert rc == 0, err
    assert "settle" in out["timings"]
    assert box.counter(copy) >= seen
    assert box.exec(copy, "cat /marker 2>/dev/null || echo none").strip() == "none"
    assert box.exec(name, "cat /marker").strip() == "kept", "the original is untouched"
