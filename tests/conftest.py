"""Shared fixtures: a private store, real workloads with known data, the CLI as users run it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def criu_usable() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        from gpusnap.criu.locate import find_criu
        find_criu()
        return True
    except Exception:  # noqa: BLE001
        return False


def pytest_report_header(config):
    """Free disk where the tests write: a CI run that ran out of it (ENOSPC) says so first."""
    import tempfile
    lines = []
    for path in (tempfile.gettempdir(), "/var/lib", "/dev/shm"):
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        lines.append(f"{path} {st.f_bavail * st.f_frsize / 2**30:.1f} GiB free")
    return "disk: " + ", ".join(lines)


@pytest.fixture(autouse=True)
def _host_thp_left_alone(request, monkeypatch):
    """Unit tests drive CudaSession with fake drivers: its checkpoint stage would switch
    the host's THP mode (cuda/hugepages.py) for nothing; test_hugepages.py tests that on
    a stand-in file. GPU tests keep the default."""
    if os.sep + "unit" + os.sep in str(request.node.fspath):
        monkeypatch.setenv("GPUSNAP_HUGE_PAGES", "off")


def pytest_collection_modifyitems(config, items):
    skip_root = pytest.mark.skip(reason="needs root and CRIU >= 4.1 (make setup)")
    usable = None
    for item in items:
        if "root" in item.keywords:
            if usable is None:
                usable = criu_usable()
            if not usable:
                item.add_marker(skip_root)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store"
    return str(path)


class Workload:
    """A memholder process tree, started the way CRIU likes: own session, stdio on files."""

    def __init__(self, state_dir: str, args: list[str]):
        self.state = state_dir
        os.makedirs(state_dir, exist_ok=True)
        log = open(os.path.join(state_dir, "log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpusnap.workloads.memholder", "--state", state_dir, *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd=REPO)
        ready = wait_json(os.path.join(state_dir, "ready"), proc=self.proc)
        self.pid = ready["pid"]
        self.children = ready["children"]

    @property
    def pids(self) -> list[int]:
        return [self.pid, *self.children]

    def report(self, pid: int | None = None, timeout: float = 30) -> dict:
        path = os.path.join(self.state, "report.json")
        if os.path.exists(path):
            os.unlink(path)
        os.kill(pid or self.pid, signal.SIGUSR1)
        return wait_json(path, timeout=timeout)

    def reap(self) -> None:
        """Collect the original (our child) once gpusnap killed it."""
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def kill_all(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        wait_pids_free(self.pids)


def wait_json(path: str, *, proc=None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"workload exited with {proc.returncode}")
        time.sleep(0.05)
    raise TimeoutError(path)


def make_weights(path: str, mib: int) -> str:
    """A safetensors file of random bf16 tensors at path (benchmarks/seed_probe.py's)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import seed_probe
    finally:
        sys.path.pop(0)
    seed_probe.make_safetensors(path, mib)
    return path


def write_images(path, files: dict[str, bytes]) -> str:
    """A directory of image files (name -> bytes) to ingest; returns path."""
    os.makedirs(path, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return path


# Bodies of CRIU wrappers (GPUSNAP_CRIU scripts that set $REAL, the real CRIU, and $MARK):
# they touch $MARK where the test acts (a signal, kill -9) and wait there until it has
# (release(mark)), at most 60 s; a fixed pause there was a deadline that a loaded host
# could miss, letting the operation run on past the point the test aims at.
AT_MARK = ('touch "$MARK"; i=0; while [ ! -e "$MARK.go" ] && [ $i -lt 600 ]; do sleep 0.05; '
           'i=$((i+1)); done')
BEFORE_CRIU = AT_MARK + '; exec "$REAL" "$@"'
AFTER_CRIU = '"$REAL" "$@"; rc=$?; ' + AT_MARK + '; exit $rc'


def path_without_network_lock_tools() -> str | None:
    """PATH less the directories holding iptables-restore or nft (what the GPU machines
    lack); None where CRIU would go with them."""
    from gpusnap.criu.locate import find_criu
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any(os.path.exists(os.path.join(d, t)) for t in ("iptables-restore", "nft"))]
    if os.path.dirname(find_criu()[0]) not in keep and not os.environ.get("GPUSNAP_CRIU"):
        return None
    return os.pathsep.join(keep)


def release(mark: str) -> None:
    """A CRIU wrapper waiting at mark goes on (AT_MARK)."""
    open(mark + ".go", "w").close()


HOOK_CONFIG = "/etc/gpusnap/config.yaml"


@contextlib.contextmanager
def hook_config(text: str):
    """/etc/gpusnap/config.yaml (what the CRIU action script and its guard read) holds
    text for the block; what was there is put back."""
    old = open(HOOK_CONFIG).read() if os.path.exists(HOOK_CONFIG) else None
    made_dir = not os.path.isdir(os.path.dirname(HOOK_CONFIG))
    os.makedirs(os.path.dirname(HOOK_CONFIG), exist_ok=True)
    with open(HOOK_CONFIG, "w") as f:
        f.write(text)
    os.chmod(HOOK_CONFIG, 0o644)
    try:
        yield HOOK_CONFIG
    finally:
        if old is None:
            os.unlink(HOOK_CONFIG)
            if made_dir:
                os.rmdir(os.path.dirname(HOOK_CONFIG))
        else:
            with open(HOOK_CONFIG, "w") as f:
                f.write(old)


def wait_until(cond, timeout: float = 30.0) -> bool:
    """Whether cond() came true within timeout seconds (asked every 10 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def wait_pids_free(pids, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.02)


@pytest.fixture
def workload(tmp_path):
    started = []

    def start(*args: str, name: str = "w") -> Workload:
        w = Workload(str(tmp_path / name), list(args))
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill_all()


@pytest.fixture
def gpusnap(store):
    """Run the real CLI in a subprocess; returns (exit code, parsed JSON or stdout, stderr)."""

    def run(*args: str, env: dict | None = None, check: bool = False):
        full_env = {**os.environ, "GPUSNAP_STORE": store,
                    "GPUSNAP_STATE_DIR": os.path.join(os.path.dirname(store), "state"),
                    **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "gpusnap", "--json", *args], cwd=REPO,
                              capture_output=True, text=True, env=full_env, timeout=600)
        try:
            out = json.loads(proc.stdout) if proc.stdout.strip() else None
        except ValueError:
            out = proc.stdout
        if check and proc.returncode != 0:
            raise AssertionError(f"gpusnap {args} exited {proc.returncode}: {proc.stderr}")
        return proc.returncode, out, proc.stderr

    return run


def commit_snapshot(repo, src: str, name: str | None = None, **fields):
    """Ingest the image directory src and commit it as a process snapshot (a Manifest)."""
    from gpusnap.model import Manifest, Target
    files, counts = repo.ingest_dir(src)
    fields.setdefault("target", Target(kind="process", root_pid=1, pids=[1]))
    m = Manifest(name=name, pids=[1], files=files,
                 **counts, **fields)
    repo.commit(m)
    return m


@pytest.fixture
def sleeper():
    """sleeper(setup='', env=None) -> a Popen of a python that runs setup, says 'up' on its
    stdout, and sleeps; killed after the test."""
    procs = []

    def start(setup: str = "", env: dict | None = None) -> subprocess.Popen:
        code = f"import sys, time\n{setup}\nprint('up', flush=True)\ntime.sleep(600)"
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == b"up"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def libz_path() -> str:
    """A small real shared library to copy under another name."""
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if os.path.exists(os.path.join(d, "libz.so.1")):
            return os.path.join(d, "libz.so.1")
    pytest.skip("no libz.so.1 to copy")


def cgroup_tree(tmp_path, cgroup: str, files: dict[str, str]) -> str:
    """A root with proc/self/cgroup holding `cgroup` and, under sys/fs/cgroup, `files`
    (relative path -> content): a host's or a container's cgroup files as hostmem.py and
    hostcpu.py read them."""
    root = tmp_path / "root"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        path = root / "sys/fs/cgroup" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return str(root)
