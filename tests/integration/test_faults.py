"""The fault matrix: real CRIU, real process trees, faults injected for real.

For every case: the original keeps running where it was running (and stays stopped where
it was stopped), no half snapshot is visible, gpusnap exits with the error's own code,
and `gpusnap verify` is clean afterwards (README.md, "Fault matrix").

Cases tested elsewhere: a flipped byte in a chunk and restore while the original runs
(test_process_roundtrip.py), two dumps and gc at once (test_concurrency.py). A target
already CUDA-locked needs a GPU: tests/gpu/test_cuda_api.py
(test_started_locked_stays_locked) checks that the CUDA state machine leaves it locked.

CRIU faults are injected through GPUSNAP_CRIU: a shell script that does something to
the target or to itself around the real CRIU. Work dirs go to a tmpfs directory of each
test's own (GPUSNAP_WORKDIR, the same code path as /dev/shm/gpusnap), so that a dump
running elsewhere on this host cannot be mistaken for one left behind.
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

from conftest import AFTER_CRIU, BEFORE_CRIU, REPO, make_weights, release, wait_pids_free

pytestmark = [pytest.mark.root]


@pytest.fixture(autouse=True)
def shm_workdir(tmp_path, monkeypatch):
    """Every gpusnap run by this module (they inherit os.environ) works under this dir."""
    import tempfile
    path = tempfile.mkdtemp(prefix="gpusnap-faults-", dir="/dev/shm")
    monkeypatch.setenv("GPUSNAP_WORKDIR", path)
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


def _real_criu() -> str:
    from gpusnap.criu.locate import find_criu
    return find_criu()[0]


def _fake_criu(tmp_path, dump_body: str, name: str = "criu-fake") -> str:
    """A CRIU whose `dump` runs dump_body: $REAL is the real CRIU, $TREE the root pid,
    $MARK a file the body may touch to tell the test where it is (CRIU runs with a
    clean environment, so these are written into the script)."""
    path = tmp_path / name
    path.write_text(f"""#!/bin/sh
REAL="{_real_criu()}"
MARK="{tmp_path / 'mark'}"
TREE=""
prev=""
for a in "$@"; do [ "$prev" = "--tree" ] && TREE="$a"; prev="$a"; done
case "$1" in
  dump) {dump_body};;
  *) exec "$REAL" "$@";;
esac
""")
    path.chmod(0o755)
    return str(path)


def _states(pids) -> set[str]:
    return {psutil.Process(p).status() for p in pids}


def _assert_running_and_healthy(w, *, children: int, threads: int = 0) -> None:
    assert _states(w.pids) <= {psutil.STATUS_RUNNING, psutil.STATUS_SLEEPING}, _states(w.pids)
    report = w.report()
    assert report["data_ok"] and report["children_ok"], report
    assert len(report["children"]) == children, report
    assert report["threads_alive"] == threads and report["threads_moving"], report


def _shm_entries() -> set[str]:
    base = os.environ["GPUSNAP_WORKDIR"]
    return set(os.listdir(base)) if os.path.isdir(base) else set()


def _assert_no_trace(gpusnap, store: str, shm_before: set[str], *, snapshots: list | None = None) -> None:
    """No (new) snapshot, a store that verifies, no work dir or temp file left behind."""
    rc, snaps, err = gpusnap("ls")
    assert rc == 0, err
    assert [s["id"] for s in snaps] == (snapshots or []), snaps
    rc, report, err = gpusnap("verify")
    assert rc == 0 and report["bad"] == [], (report, err)
    assert _shm_entries() <= shm_before, "a dump work dir was left on /dev/shm"
    tmp = os.path.join(store, "tmp")
    assert not os.path.isdir(tmp) or not os.listdir(tmp), os.listdir(tmp)
    assert not [n for n in os.listdir(os.path.join(store, "snapshots")) if not n.endswith(".json")], \
        "a manifest temp file was left"


def _start_cli(store: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpusnap", "--json", "--store", store, *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _finish(proc: subprocess.Popen) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, json.loads(out) if out.strip() else None, err


def _wait_file(path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"gpusnap ended before {path} appeared: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)


# ---- CRIU dies or fails --------------------------------------------------------------------

def test_criu_killed_mid_dump_leaves_the_original_running(workload, gpusnap, store, tmp_path):
    fake = _fake_criu(tmp_path, '"$REAL" "$@" & pid=$!; sleep 0.05; kill -9 $pid; exit 137')
    w = workload("--mib", "64", "--children", "1", "--threads", "1")
    shm = _shm_entries()
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), env={"GPUSNAP_CRIU": fake})
    if rc == 5 and out["error"] == "TargetNotFound":
        # SIGKILL landed while CRIU was injecting its parasite (the task's code at the
        # syscall ip is CRIU's then): the task cannot go on, a CRIU limit. gpusnap says
        # the process exited, keeps CRIU's log, and leaves nothing else behind.
        log = err.split("CRIU log kept at ")[1].split()[0]
        with open(log) as f:
            assert "arasite" in " ".join(f.read().splitlines()[-3:]), "the target died elsewhere"
        _assert_no_trace(gpusnap, store, shm)
        return
    assert rc == 11, err
    assert out["error"] == "CriuFailed"
    _assert_running_and_healthy(w, children=1, threads=1)
    _assert_no_trace(gpusnap, store, shm)


def test_criu_failing_after_it_stopped_the_tree_resumes_it(workload, gpusnap, store, tmp_path):
    """The real dump runs (and leaves the tree stopped), then CRIU reports failure."""
    fake = _fake_criu(tmp_path, '"$REAL" "$@"; exit 1')
    w = workload("--mib", "32", "--children", "1")
    shm = _shm_entries()
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), env={"GPUSNAP_CRIU": fake})
    assert rc == 11 and out["error"] == "CriuFailed", err
    _assert_running_and_healthy(w, children=1)
    _assert_no_trace(gpusnap, store, shm)


def test_criu_restore_failing_on_the_uffd_path_says_why_at_once(workload, gpusnap, store, tmp_path):
    """CRIU fails before it hands over every userfaultfd: its own error is what gpusnap
    reports, as soon as it has exited (not the count of userfaultfds after a minute)."""
    w = workload("--mib", "16")
    rc, snap, err = gpusnap("dump", "--pid", str(w.pid))
    assert rc == 0, err
    w.reap()
    fake = tmp_path / "criu-fails-restore"
    fake.write_text(f"""#!/bin/sh
case "$1" in
  restore) echo "fake: task 42 could not be restored" >&2; exit 1;;
  *) exec "{_real_criu()}" "$@";;
esac
""")
    fake.chmod(0o755)
    t = time.monotonic()
    rc, out, err = gpusnap("restore", snap["id"], "--pages", "uffd", env={"GPUSNAP_CRIU": str(fake)})
    assert rc == 11 and out["error"] == "CriuFailed", err
    assert "criu restore failed" in out["message"] and "task 42 could not be restored" in out["message"], out
    assert time.monotonic() - t < 30, "gpusnap saw CRIU exit"
    assert not psutil.pid_exists(w.pid), "nothing restored"
    rc, res, err = gpusnap("restore", snap["id"])
    assert rc == 0, err
    os.kill(res["pid"], signal.SIGKILL)


def test_criu_missing_fails_before_the_target_is_touched(workload, gpusnap, store):
    """GPUSNAP_CRIU names the CRIU to use: no fallback to PATH or /opt/gpusnap/criu."""
    w = workload("--mib", "16")
    rc, out, err = gpusnap("dump", "--pid", str(w.pid),
                           env={"GPUSNAP_CRIU": "/nonexistent/criu", "PATH": "/usr/bin:/bin"})
    assert rc == 10, err
    assert out["error"] == "CriuMissing" and "/nonexistent/criu" in out["message"]
    assert not os.path.exists(store), "the store is not even opened"
    _assert_running_and_healthy(w, children=0)


# ---- the target -------------------------------------------------------------------------------

def test_target_exiting_during_the_dump(workload, gpusnap, store, tmp_path):
    fake = _fake_criu(tmp_path, 'kill -9 "$TREE"; sleep 0.2; exec "$REAL" "$@"')
    w = workload("--mib", "32", "--children", "1")
    shm = _shm_entries()
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), env={"GPUSNAP_CRIU": fake})
    assert rc == 5, err
    assert out["error"] == "TargetNotFound" and "exited during the dump" in out["message"], out
    w.reap()
    _assert_no_trace(gpusnap, store, shm)


def _stop(w) -> None:
    for pid in w.pids:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while _states(w.pids) != {psutil.STATUS_STOPPED}:
        assert time.monotonic() < deadline, _states(w.pids)
        time.sleep(0.01)


def _cont_and_check(w, children: int) -> None:
    for pid in w.pids:
        os.kill(pid, signal.SIGCONT)
    _assert_running_and_healthy(w, children=children)


def test_a_stopped_target_is_dumped_and_left_stopped(workload, gpusnap, store):
    """gpusnap leaves a SIGSTOP'd tree as it found it: stopped after --leave-running."""
    w = workload("--mib", "32", "--children", "1")
    _stop(w)
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), "--leave-running")
    assert rc == 0, err
    assert _states(w.pids) == {psutil.STATUS_STOPPED}
    _cont_and_check(w, children=1)


def test_a_failed_dump_of_a_stopped_target_leaves_it_stopped(workload, gpusnap, store, tmp_path):
    """The undo resumes only what gpusnap stopped: a tree stopped before stays stopped."""
    fake = _fake_criu(tmp_path, '"$REAL" "$@"; exit 1')
    w = workload("--mib", "32", "--children", "1")
    _stop(w)
    shm = _shm_entries()
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), env={"GPUSNAP_CRIU": fake})
    assert rc == 11, err
    time.sleep(0.2)
    assert _states(w.pids) == {psutil.STATUS_STOPPED}, "no SIGCONT for a tree stopped before"
    _assert_no_trace(gpusnap, store, shm)
    _cont_and_check(w, children=1)


def test_a_stopped_target_restores_stopped(workload, gpusnap, store):
    """CRIU records the stop: the restored tree is stopped as the original was."""
    w = workload("--mib", "16", "--children", "1")
    _stop(w)
    rc, out, err = gpusnap("dump", "--pid", str(w.pid))
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)
    rc, res, err = gpusnap("restore", out["id"])
    assert rc == 0, err
    assert _states(w.pids) == {psutil.STATUS_STOPPED}
    _cont_and_check(w, children=1)


# ---- the store -----------------------------------------------------------------------------------

@pytest.fixture
def small_store(store):
    """The store on a 24 MiB tmpfs of its own; unmounted afterwards."""
    os.makedirs(store)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", store], check=True)
    yield store
    subprocess.run(["umount", "-l", store], check=False)


def test_disk_full_during_ingest(workload, gpusnap, small_store):
    w = workload("--mib", "128", "--children", "1")
    shm = _shm_entries()
    rc, out, err = gpusnap("dump", "--pid", str(w.pid))
    assert rc == 44, err
    assert out["error"] == "StoreFull"
    _assert_running_and_healthy(w, children=1)
    _assert_no_trace(gpusnap, small_store, shm)
    rc, freed, err = gpusnap("gc")
    assert rc == 0 and freed["chunks"] > 0, err
    w2 = workload("--mib", "4", name="small")
    rc, out, err = gpusnap("dump", "--pid", str(w2.pid), "--leave-running")
    assert rc == 0, "a dump that fits works once gc freed the space"


def test_truncated_manifest_is_reported_and_refused(workload, gpusnap, store):
    w = workload("--mib", "16")
    rc, out, err = gpusnap("dump", "--pid", str(w.pid))
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)
    path = os.path.join(store, "snapshots", out["id"] + ".json")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)

    rc, report, err = gpusnap("verify")
    assert rc == 42, err
    report = json.JSONDecoder().raw_decode(report)[0]       # the report, then the error
    assert report["bad"][0]["snapshot"] == out["id"], report
    rc, res, err = gpusnap("restore", out["id"])
    assert rc == 42 and res["error"] == "IntegrityError", err
    assert not psutil.pid_exists(w.pid), "nothing restored"
    assert gpusnap("ls")[1] == [], "ls skips what it cannot read"
    rc, res, err = gpusnap("gc")
    assert rc == 42, "gc deletes nothing while a manifest is unreadable"
    assert gpusnap("rm", out["id"])[0] == 0
    assert gpusnap("verify")[0] == 0


# ---- signals ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stage", ["before_criu", "after_criu"])
def test_signal_during_criu_dump(workload, gpusnap, store, tmp_path, sig, stage):
    """The signal lands while gpusnap waits for CRIU: CRIU is let finish (never killed
    with its parasite inside the target), then everything is undone."""
    fake = _fake_criu(tmp_path, BEFORE_CRIU if stage == "before_criu" else AFTER_CRIU)
    mark = str(tmp_path / "mark")
    w = workload("--mib", "32", "--children", "1", "--threads", "1")
    shm = _shm_entries()
    proc = _start_cli(store, "dump", "--pid", str(w.pid), env={"GPUSNAP_CRIU": fake})
    _wait_file(mark, proc)
    time.sleep(0.1)
    proc.send_signal(sig)
    release(mark)
    rc, out, err = _finish(proc)
    assert rc == 130, err
    assert out["error"] == "Interrupted"
    _assert_running_and_healthy(w, children=1, threads=1)
    _assert_no_trace(gpusnap, store, shm)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_ingest(workload, gpusnap, store, tmp_path, sig):
    """The signal lands mid-ingest: every ingest worker stored its first batch of chunks
    and waits before its next (GPUSNAP_TEST_PAUSE=ingest_batch), the rest are queued.
    Staged pages: CRIU writes pages images, ingested after it exits. The queued batches
    are dropped, not written: the workers are stopped, not waited for."""
    from gpusnap.store.parallel import BATCH_BYTES, workers
    mark = str(tmp_path / "mark")
    mib = 768
    w = workload("--mib", str(mib), "--children", "1")
    shm = _shm_entries()
    proc = _start_cli(store, "dump", "--pid", str(w.pid), "--pages", "staged",
                      env={"GPUSNAP_TEST_PAUSE": f"ingest_batch:{mark}"})
    _wait_file(mark, proc)
    assert _states(w.pids) == {psutil.STATUS_STOPPED}, "held by the dump until its commit"
    proc.send_signal(sig)
    started = time.monotonic()
    rc, out, err = _finish(proc)
    assert rc == 130, err
    assert out["error"] == "Interrupted"
    assert time.monotonic() - started < 60, "a paused worker waits 120 s: stopped, not waited for"
    stored = sum(e.stat().st_size for d in os.scandir(os.path.join(store, "chunks")) if d.is_dir()
                 for e in os.scandir(d.path))
    assert stored <= (workers() + 1) * (BATCH_BYTES + (1 << 20)) < mib << 20, \
        f"{stored} bytes of chunks: only the first batches were stored"
    _assert_running_and_healthy(w, children=1)
    _assert_no_trace(gpusnap, store, shm)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_pages_stream(workload, gpusnap, store, tmp_path, sig):
    """The signal lands while CRIU streams the pages to gpusnap (the default path): gpusnap
    waits once CRIU's first pages have come in (GPUSNAP_TEST_PAUSE=pages_stream), CRIU
    holding the tree with the rest unsent. The stream is cut, CRIU fails on its own and
    lets the tree go on; gpusnap undoes the rest and leaves no trace."""
    mark = str(tmp_path / "mark")
    w = workload("--mib", "768", "--children", "1")
    shm = _shm_entries()
    proc = _start_cli(store, "dump", "--pid", str(w.pid),
                      env={"GPUSNAP_TEST_PAUSE": f"pages_stream:{mark}"})
    _wait_file(mark, proc)
    proc.send_signal(sig)
    started = time.monotonic()
    rc, out, err = _finish(proc)
    assert rc == 130 and out["error"] == "Interrupted", err
    assert time.monotonic() - started < 60, "the stream is cut at once, not after the 120 s pause"
    _assert_running_and_healthy(w, children=1)
    _assert_no_trace(gpusnap, store, shm)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_criu_restore(workload, gpusnap, store, tmp_path, sig):
    """CRIU restore is let finish too; then the restored tree is killed (a restore that
    reports Interrupted leaves nothing running) and the snapshot restores later."""
    w = workload("--mib", "32", "--children", "1")
    rc, snap, err = gpusnap("dump", "--pid", str(w.pid))
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)
    fake = _fake_criu(tmp_path, 'exec "$REAL" "$@"')
    fake_text = open(fake).read().replace(
        '  *) exec "$REAL" "$@";;', f'  restore) {BEFORE_CRIU};;\n  *) exec "$REAL" "$@";;')
    open(fake, "w").write(fake_text)
    shm = _shm_entries()
    proc = _start_cli(store, "restore", snap["id"], env={"GPUSNAP_CRIU": fake})
    _wait_file(str(tmp_path / "mark"), proc)
    time.sleep(0.1)
    proc.send_signal(sig)
    release(str(tmp_path / "mark"))
    rc, out, err = _finish(proc)
    assert rc == 130 and out["error"] == "Interrupted", err
    wait_pids_free(w.pids)
    assert not any(psutil.pid_exists(p) for p in w.pids), "the restored tree is killed"
    _assert_no_trace(gpusnap, store, shm, snapshots=[snap["id"]])
    rc, out, err = gpusnap("restore", snap["id"])
    assert rc == 0, err
    _assert_running_and_healthy(w, children=1)


def test_signal_while_pages_stream_stops_a_dumps_seed(workload, gpusnap, store, tmp_path):
    """`dump --seed`: SIGTERM while CRIU streams, the seed storing the weights file on its
    own process. Both stop: none of gpusnap's processes left, no temp file, no seed record
    but a whole one (had the seed finished first), the tree running as before."""
    weights = make_weights(str(tmp_path / "model.safetensors"), 384)
    mark = str(tmp_path / "mark")
    w = workload("--mib", "256", "--children", "1")
    shm = _shm_entries()
    proc = _start_cli(store, "dump", "--pid", str(w.pid), "--seed", weights,
                      env={"GPUSNAP_TEST_PAUSE": f"pages_stream:{mark}"})
    _wait_file(mark, proc)
    seeding = [c for c in psutil.Process(proc.pid).children() if c.pid != w.pid]
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert rc == 130 and out["error"] == "Interrupted", err
    wait_pids_free([c.pid for c in seeding])
    assert not [c.pid for c in seeding if psutil.pid_exists(c.pid)]
    _assert_running_and_healthy(w, children=1)
    _assert_no_trace(gpusnap, store, shm)
    temps = [n for _d, _s, names in os.walk(store) for n in names if n.startswith(".tmp-")]
    assert temps == []
    rc, listed, err = gpusnap("seed", "ls")
    assert rc == 0 and listed["unreadable"] == [], (listed, err)
