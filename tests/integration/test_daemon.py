"""gpusnapd for real: a daemon process on a real unix socket, the real CLI talking to it,
real CRIU on real process trees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from gpusnap.daemon.client import Client, Unreachable

from conftest import REPO, make_weights, wait_pids_free
from s3server import s3_env, s3_server  # noqa: F401

pytestmark = [pytest.mark.root]


class Daemon:
    def __init__(self, store: str, socket_dir: str, *args: str):
        self.socket = os.path.join(socket_dir, "gpusnapd.sock")
        self.store = store
        self.log = open(os.path.join(socket_dir, "daemon.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpusnap", "--store", store, "daemon", "--socket", self.socket, *args],
            cwd=REPO, stdout=self.log, stderr=self.log, start_new_session=True)
        self.client = Client(self.socket, timeout=30)
        deadline = time.monotonic() + 30
        while not self._answers():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.logs()
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return self.client.request("GET", "/v1/status")[0] == 200
        except (Unreachable, OSError):
            return False

    @property
    def env(self) -> dict:
        return {"GPUSNAP_SOCKET": self.socket}

    def status(self) -> dict:
        code, body = self.client.request("GET", "/v1/status")
        assert code == 200, body
        return body

    def logs(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def cli(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "gpusnap", "--json", *args], cwd=REPO,
                                env={**os.environ, "GPUSNAP_STORE": self.store, **self.env,
                                     **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self.log.close()
        return code


@pytest.fixture
def socket_dir():
    path = tempfile.mkdtemp(prefix="gpusnapd-test-")
    os.chmod(path, 0o755)                       # reachable by the unprivileged peers below
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


@pytest.fixture
def daemon(store, socket_dir):
    started = []

    def start(*args: str) -> Daemon:
        d = Daemon(store, socket_dir, *args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def _done(proc: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, json.loads(out) if out.strip() else None, err


def _wait_stopped(pid: int, timeout: float = 60) -> None:
    """Until CRIU has dumped the tree and left it stopped (ingest runs then)."""
    deadline = time.monotonic() + timeout
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, "the dump never stopped the target"
        time.sleep(0.01)


def _paused_at_the_commit(tmp_path) -> dict:
    """The env of a dump that waits at its commit (GPUSNAP_TEST_PAUSE, engine/intent.py)
    for the signal that the test sends once CRIU has left the tree stopped: wherever that
    signal lands after CRIU (the log moved, pages_finish, ingest, the pause), it lands
    before the snapshot is committed. Without the pause the rest of the dump takes about
    0.1 s, less than a loaded host may take to send it."""
    return {"GPUSNAP_TEST_PAUSE": f"commit:{tmp_path / 'paused'}"}


def _assert_running(w) -> None:
    deadline = time.monotonic() + 60
    while any(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in w.pids):
        assert time.monotonic() < deadline, "target left stopped"
        time.sleep(0.05)
    report = w.report()
    assert report["data_ok"] and report["children_ok"], report


def test_cli_dump_and_restore_through_the_daemon(workload, gpusnap, daemon, tmp_path):
    d = daemon()
    w = workload("--mib", "64", "--children", "1", "--threads", "1")
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), "--name", "viad", env=d.env)
    assert rc == 0, err
    assert out["via"] == "daemon" and out["timings"]["criu_dump"] > 0, out
    w.reap()
    wait_pids_free(w.pids)

    rc, out, err = gpusnap("restore", "viad", env=d.env)
    assert rc == 0, err
    assert out["via"] == "daemon" and out["pid"] == w.pid, out
    assert w.report()["data_ok"]
    rc, out, _ = gpusnap("inspect", "viad")                     # standalone says so
    assert rc == 0 and out["via"] == "cli"
    rc, out, _ = gpusnap("inspect", "nosuch", env=d.env)        # same exit codes through it
    assert rc == 3 and out["error"] == "SnapshotNotFound"
    code, warmed = d.client.request("POST", "/v1/warm", {"snapshots": ["viad"]})     # prefetch
    assert code == 200 and warmed["warmed"][0]["bytes"] >= 64 << 20, warmed
    weights = make_weights(str(tmp_path / "model.safetensors"), 8)
    code, out = d.client.request("POST", "/v1/dump", {"pid": w.pid, "leave_running": True, "name": "api",
                                                       "seed": [weights]})
    assert code == 200 and out["via"] == "daemon" and out["bytes_logical"] >= 64 << 20, out
    assert out["seed"]["reused"] is False and out["seed"]["bytes_seeded"] > 0, out
    code, out = d.client.request("POST", "/v1/dump", {"pid": w.pid, "leave_running": True,
                                                       "seed": ["model.safetensors"]})
    assert code == 400 and "absolute paths" in out["message"], out
    code, out = d.client.request("POST", "/v1/dump", {"pid": w.pid, "leave_running": True,
                                                       "seed": ["auto"]})   # names no weights
    assert code == 200 and out["seed"]["auto"] is True and out["seed"]["sources"] == [], out
    code, out = d.client.request("POST", "/v1/restore", {"snapshot": "nosuch"})
    assert code == 404 and out["error"] == "SnapshotNotFound", out
    assert w.report()["data_ok"]
    assert d.status()["operations"] == [] and d.status()["workdir_entries"] == []


def test_a_daemon_on_an_s3_store_dumps_and_restores(workload, s3_env, socket_dir, tmp_path,
                                                    monkeypatch):
    """gpusnapd serving an s3:// store (its client library loaded once in the daemon:
    api.warm_imports), the CLI forwarding to it."""
    monkeypatch.setenv("GPUSNAP_CACHE", str(tmp_path / "cache"))
    d = Daemon(f"s3://{s3_env}/viad", socket_dir)
    try:
        w = workload("--mib", "32", "--children", "1", "--threads", "1")
        rc, out, err = _done(d.cli("dump", "--pid", str(w.pid), "--name", "s3d"))
        assert rc == 0 and out["via"] == "daemon", err
        w.reap()
        wait_pids_free(w.pids)
        rc, out, err = _done(d.cli("restore", "s3d"))
        assert rc == 0 and out["via"] == "daemon" and out["pid"] == w.pid, err
        assert w.report()["data_ok"]
        _kill_restored(w)
    finally:
        assert d.stop() == 0, d.logs()


def test_the_config_files_socket_sends_the_cli_to_the_daemon(workload, gpusnap, daemon, tmp_path):
    """`socket:` in the config file is enough; GPUSNAP_SOCKET set empty runs standalone."""
    d = daemon()
    conf = tmp_path / "config.yaml"
    conf.write_text(f"socket: {d.socket}\n")
    env = {"GPUSNAP_CONFIG": str(conf)}
    w = workload("--mib", "8")
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), "--leave-running", env=env)
    assert rc == 0 and out["via"] == "daemon", (out, err)
    rc, out, err = gpusnap("verify", env=env)
    assert rc == 0 and out["via"] == "daemon", (out, err)
    rc, out, err = gpusnap("verify", env={**env, "GPUSNAP_SOCKET": ""})
    assert rc == 0 and out["via"] == "cli", (out, err)
    conf.write_text(f"socket: {tmp_path / 'nobody.sock'}\n")         # none answers there
    rc, out, err = gpusnap("verify", env=env)
    assert rc == 0 and out["via"] == "cli", (out, err)


def test_two_concurrent_restores_of_two_snapshots_are_both_healthy(workload, gpusnap, daemon):
    d = daemon()
    ws = [workload("--mib", "96", "--children", "1", "--seed", str(i), name=f"w{i}") for i in range(2)]
    for i, w in enumerate(ws):
        rc, out, err = gpusnap("dump", "--pid", str(w.pid), "--name", f"s{i}", env=d.env)
        assert rc == 0, err
        w.reap()
        wait_pids_free(w.pids)
    restores = [d.cli("restore", f"s{i}") for i in range(2)]
    for w, proc in zip(ws, restores):
        rc, out, err = _done(proc)
        assert rc == 0, err
        assert out["pid"] == w.pid and out["via"] == "daemon"
    for w in ws:
        report = w.report()
        assert report["data_ok"] and report["children_ok"], report


def test_a_dump_while_a_restore_runs(workload, gpusnap, daemon):
    d = daemon()
    a = workload("--mib", "256", name="a")
    b = workload("--mib", "32", "--children", "1", "--seed", "5", name="b")
    rc, _, err = gpusnap("dump", "--pid", str(a.pid), "--name", "snap-a", env=d.env)
    assert rc == 0, err
    a.reap()
    wait_pids_free(a.pids)
    restore = d.cli("restore", "snap-a")
    dump = d.cli("dump", "--pid", str(b.pid), "--leave-running", "--name", "snap-b")
    seen = 0
    while restore.poll() is None or dump.poll() is None:
        seen = max(seen, len(d.status()["operations"]))
        time.sleep(0.02)
    for proc in (restore, dump):
        rc, out, err = _done(proc)
        assert rc == 0, err
    assert seen == 2, "the two operations never ran at once"
    assert a.report()["data_ok"]
    _assert_running(b)


def _curl(socket: str, *args: str, uid: int, gid: int) -> tuple[int, str]:
    proc = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                           "curl", "-s", "-w", "\n%{http_code}", "--unix-socket", socket, *args],
                          capture_output=True, text=True, timeout=30)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def test_non_root_peers_are_refused_or_read_only(workload, gpusnap, daemon):
    d = daemon("--group", "nogroup")
    assert oct(os.stat(d.socket).st_mode & 0o777) == "0o660"
    code, body = _curl(d.socket, "http://d/v1/status", uid=65534, gid=65534)
    assert code == 200, body                                            # the group reads
    code, body = _curl(d.socket, "-X", "POST", "-d", '{"pid": 1}', "http://d/v1/dump", uid=65534, gid=65534)
    assert code == 403 and "may not" in body, body                      # but dumps nothing
    code, body = _curl(d.socket, "-X", "POST", "-d", '{"argv": ["rm", "x"], "cwd": "/"}',
                       "http://d/v1/run", uid=65534, gid=65534)
    assert code == 403, body
    code, body = _curl(d.socket, "-X", "POST", "-d", '{"argv": ["--json", "ls"], "cwd": "/"}',
                       "http://d/v1/run", uid=65534, gid=65534)
    assert code == 200 and '"exit_code": 0' in body, body                # ls on the daemon's store
    code, body = _curl(d.socket, "http://d/v1/status", uid=12345, gid=12345)
    assert code == 0, body                                              # no access to the socket at all


@pytest.mark.parametrize("door", ["cli", "client"])
def test_daemon_killed_mid_dump_leaves_the_target_running(workload, daemon, store, tmp_path, door):
    """Through the CLI, or Client.run as a controller calls it: the caller is told the
    daemon went away, the target runs on."""
    import threading
    from gpusnap.errors import GpusnapError
    d = daemon()
    w = workload("--mib", "768", "--children", "1")
    env = _paused_at_the_commit(tmp_path)
    if door == "cli":
        dump = d.cli("dump", "--pid", str(w.pid), env=env)
    else:
        told: list = []

        def run():
            try:
                told.append(Client(d.socket).run(["--json", "--store", d.store, "dump", "--pid", str(w.pid)],
                                                 env=env))
            except GpusnapError as e:
                told.append(e)
        caller = threading.Thread(target=run)
        caller.start()
    _wait_stopped(w.pid)
    os.kill(d.proc.pid, signal.SIGKILL)                 # mid-ingest: CRIU left the tree stopped
    if door == "cli":
        rc, out, err = _done(dump)
        assert rc != 0 and "went away" in err, err
    else:
        caller.join(300)
        assert isinstance(told[0], GpusnapError) and "went away" in told[0].message, told
    _assert_running(w)
    d.proc.wait()
    d2 = daemon()
    deadline = time.monotonic() + 30                    # the orphaned child finishes its undo
    while d2.status()["workdir_entries"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert d2.status()["workdir_entries"] == []
    assert Client(d2.socket).request("GET", "/v1/snapshots")[1] == []


@pytest.mark.parametrize("how", ["disconnect", "ctrl-c"])
def test_cancelled_dump_is_undone(workload, daemon, how, tmp_path):
    d = daemon()
    w = workload("--mib", "768", "--children", "1")
    dump = d.cli("dump", "--pid", str(w.pid), env=_paused_at_the_commit(tmp_path))
    _wait_stopped(w.pid)
    dump.send_signal(signal.SIGKILL if how == "disconnect" else signal.SIGINT)
    rc, out, err = _done(dump)
    if how == "ctrl-c":
        assert rc == 130 and out["error"] == "Interrupted", err      # the CLI's own answer
    _assert_running(w)
    deadline = time.monotonic() + 30
    while d.status()["operations"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.status()["operations"] == [] and d.status()["workdir_entries"] == []
    assert Client(d.socket).request("GET", "/v1/snapshots")[1] == []


def test_sigterm_interrupts_operations_in_flight_and_stops(workload, daemon, tmp_path):
    d = daemon()
    w = workload("--mib", "768")
    dump = d.cli("dump", "--pid", str(w.pid), env=_paused_at_the_commit(tmp_path))
    _wait_stopped(w.pid)
    d.proc.send_signal(signal.SIGTERM)
    rc, out, err = _done(dump)
    assert rc == 130 and out["error"] == "Interrupted", err
    _assert_running(w)
    assert d.proc.wait(timeout=60) == 0
    assert not os.path.exists(d.socket)


@pytest.mark.slow
def test_ten_cycles_leave_no_fd_rss_or_workdir_growth(workload, gpusnap, daemon):
    d = daemon()
    w = workload("--mib", "16", "--children", "1")
    samples = []
    for i in range(10):
        rc, out, err = gpusnap("dump", "--pid", str(w.pid), env=d.env)
        assert rc == 0, err
        if i == 0:
            w.reap()
        wait_pids_free(w.pids)
        rc, out, err = gpusnap("restore", out["id"], env=d.env)
        assert rc == 0, err
        st = d.status()
        samples.append((st["fds"], st["rss_bytes"], st["workdir_entries"]))
    assert w.report()["data_ok"]
    assert samples[-1][0] == samples[1][0], samples
    assert samples[-1][1] - samples[1][1] < 16 << 20, samples
    assert all(entries == [] for _, _, entries in samples), samples


def _kill_restored(w) -> None:
    for pid in w.pids:
        os.kill(pid, signal.SIGKILL)
    wait_pids_free(w.pids)


def test_a_prefetched_snapshot_restores_from_its_cache_until_the_cache_is_stale(workload, gpusnap, daemon):
    d = daemon()
    w = workload("--mib", "64", "--children", "1", "--threads", "1")
    rc, snap, err = gpusnap("dump", "--pid", str(w.pid), "--name", "pre", env=d.env)
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)
    rc, warmed, err = gpusnap("warm", "pre", "--pages", "uffd", env=d.env)     # prefetch, as a user does
    assert rc == 0 and warmed[0]["pages"] == "uffd", err
    cache = os.path.dirname(warmed[0]["path"])
    assert os.path.exists(os.path.join(cache, "plan.json"))
    for _ in range(2):                                  # one cache, many restores
        rc, res, err = gpusnap("restore", "pre", "--pages", "uffd", env=d.env)
        assert rc == 0, err
        assert res["via"] == "daemon" and res["pid"] == w.pid
        assert "materialise" not in res["timings"] and any("warm cache" in n for n in res["notes"]), res
        assert res["fill"]["bytes"] >= 64 << 20, "every lazy page placed from the store"
        report = w.report()
        assert report["data_ok"] and report["children_ok"], report
        _kill_restored(w)

    with open(os.path.join(cache, "plan.json"), "w") as f:   # a damaged cache is not used
        f.write("{")
    rc, res, err = gpusnap("restore", "pre", "--pages", "uffd", env=d.env)
    assert rc == 0, err
    assert res["timings"]["materialise"] > 0 and not any("warm cache" in n for n in res["notes"])
    assert w.report()["data_ok"]
    _kill_restored(w)
    rc, _, err = gpusnap("warm", "pre", "--pages", "uffd", env=d.env)   # rebuilt
    assert rc == 0, err
    assert json.load(open(os.path.join(cache, "plan.json")))["tasks"] >= 2

    with open(os.path.join(cache, "digest"), "w") as f:
        f.write("0" * 64)
    rc, res, err = gpusnap("restore", "pre", "--pages", "uffd", env=d.env)     # a stale digest
    assert rc == 0 and "materialise" in res["timings"], err
    _kill_restored(w)
    rc, warmed, err = gpusnap("warm", "pre", "--pages", "uffd", env=d.env)
    assert rc == 0 and os.path.dirname(warmed[0]["path"]) == cache, err

    rc, _, err = gpusnap("rm", "pre", env=d.env)        # the snapshot goes: its cache too
    assert rc == 0, err
    assert not os.path.exists(os.path.dirname(cache))
    rc, out, _ = gpusnap("restore", "pre", env=d.env)
    assert rc == 3 and out["error"] == "SnapshotNotFound"
    assert d.status()["operations"] == [] and d.status()["workdir_entries"] == []


def test_the_cli_that_talks_to_the_daemon_stays_thin(gpusnap, daemon):
    """The forwarding CLI imports no engine, store, CUDA or torch."""
    d = daemon()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gpusnap", "--json", "ls"], cwd=REPO,
                          env={**os.environ, "GPUSNAP_STORE": d.store, **d.env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "gpusnap.daemon.client" in imported
    heavy = {m for m in imported if m.split(".")[:2] in (["gpusnap", "engine"], ["gpusnap", "store"],
                                                         ["gpusnap", "cuda"], ["gpusnap", "criu"])
             or m.split(".")[0] in ("torch", "pynvml", "zstandard", "aiohttp", "psutil")}
    assert not heavy, sorted(heavy)


def test_suspend_resume_and_ps_go_through_the_daemon_with_the_cli_s_answers(workload, gpusnap, daemon):
    """What a standby pool and a GPU switch call: the same rows, errors and exit codes
    through the daemon as standalone (no CUDA here: the refusals are the answers)."""
    d = daemon()
    w = workload("--mib", "8")
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), "--name", "parked")
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)
    rc, out, err = gpusnap("restore", "parked", env=d.env)
    assert rc == 0 and out["via"] == "daemon", err
    alone = gpusnap("ps", env={"GPUSNAP_SOCKET": ""})
    through = gpusnap("ps", env=d.env)
    assert through[0] == alone[0] == 0 and through[1] == alone[1], (alone, through)
    assert any(row["pid"] == w.pid for row in through[1]), through
    for command in (("suspend", str(w.pid)), ("resume", str(w.pid)),
                    ("switch", str(w.pid), str(os.getpid()))):
        alone = gpusnap(*command, env={"GPUSNAP_SOCKET": ""})
        through = gpusnap(*command, env=d.env)
        assert through[0] == alone[0] != 0, (command, alone, through)
        assert through[1]["error"] == alone[1]["error"], (command, alone, through)
    report = w.report()
    assert report["data_ok"] and report["children_ok"], report


def test_a_controller_runs_commands_with_the_client_and_no_cli(daemon, tmp_path):
    """Client.run: what a controller calls instead of starting a CLI per command; the
    CLI's exit codes and output, a refusal as a GpusnapError, no daemon as Unreachable."""
    from gpusnap.errors import GpusnapError
    d = daemon()
    client = Client(d.socket, timeout=60)
    code, out, err = client.run(["--json", "ps"], env={"GPUSNAP_STORE": d.store, "PATH": "/nowhere",
                                                        "GPUSNAP_STATE_DIR": str(tmp_path / "state")})
    assert code == 0 and json.loads(out) == [], err
    code, out, err = client.run(["--json", "resume", "999999"])
    assert code == 25 and json.loads(out)["error"] == "NotParked" and "nothing parked" in err
    with pytest.raises(GpusnapError, match="does not run") as refused:
        client.run(["seed", "ls"])
    assert refused.value.exit_code != 0
    with pytest.raises(Unreachable):
        Client(str(tmp_path / "none.sock")).run(["ps"])
