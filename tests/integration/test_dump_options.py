"""dump's podman-like options on a real process tree: --compress, --keep, --no-tcp-established,
--no-file-locks; restore --keep."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import wait_pids_free

pytestmark = pytest.mark.root


def test_compress_none_keep_and_criu_options(workload, gpusnap, store):
    w = workload("--mib", "16")
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), "--leave-running", "--compress", "none",
                           "--keep", "--no-tcp-established", "--no-file-locks")
    assert rc == 0, err
    kept = [line.split(" at ", 1)[1] for line in err.splitlines() if "work dir kept at" in line]
    assert len(kept) == 1 and os.path.isdir(kept[0])
    try:
        assert os.path.exists(os.path.join(kept[0], "logs", "dump.log"))
        assert os.listdir(os.path.join(kept[0], "images"))
    finally:
        shutil.rmtree(kept[0], ignore_errors=True)
    rc, out2, err = gpusnap("dump", "--pid", str(w.pid), "--leave-running", "--compress", "19")
    assert rc == 0, err
    assert out2["bytes_new"] < out["bytes_new"]     # same chunk ids: only changed pages are new
    w.kill_all()
    wait_pids_free(w.pids)
    rc, res, err = gpusnap("restore", out["id"], "--keep")
    assert rc == 0, err
    kept = [line.split(" at ", 1)[1] for line in err.splitlines() if "work dir kept at" in line]
    assert kept and all(os.path.isdir(p) for p in kept)
    for p in kept:
        shutil.rmtree(p, ignore_errors=True)
    assert w.report(res["pid"])["data_ok"]
    w.kill_all()


def test_bad_compress_level_is_a_usage_error(gpusnap):
    rc, out, err = gpusnap("dump", "--pid", "1", "--compress", "30")
    assert rc == 2 and out["exit_code"] == 2


@pytest.mark.parametrize("pages", ["uffd", "criu"])
def test_compress_bf16_restores_on_both_page_paths(workload, gpusnap, pages):
    """Byte-plane chunks (store/codec.py) go through the uffd fill and CRIU's own page
    path alike; verify re-derives every id from them."""
    w = workload("--mib", "16")
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), "--compress", "bf16")
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)
    rc, ver, err = gpusnap("verify", out["id"])
    assert rc == 0, err
    rc, res, err = gpusnap("restore", out["id"], "--pages", pages)
    assert rc == 0, err
    assert res["page_path"] == pages
    assert w.report()["data_ok"]
    w.kill_all()


def test_direct_io_dump_is_verified_and_restores(workload, gpusnap, store):
    """GPUSNAP_DIRECT_IO=1: the page stream's workers write chunk files with O_DIRECT
    (store/fsutil.py), padded to 4 KiB and cut back; verify re-derives every id and the
    restore brings every byte back."""
    w = workload("--mib", "16")
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), env={"GPUSNAP_DIRECT_IO": "1"})
    assert rc == 0, err
    assert out["timings"]["stream_private"] == 0    # a stream that does not grow: shared slots
    w.reap()
    wait_pids_free(w.pids)
    assert not os.listdir(os.path.join(store, "tmp"))
    _verified_and_restored(gpusnap, w, out["id"])


def _verified_and_restored(gpusnap, w, snap_id: str) -> None:
    """verify re-derives every id of snap_id; its restore brings w's every byte back."""
    rc, _ver, err = gpusnap("verify", snap_id)
    assert rc == 0, err
    rc, _res, err = gpusnap("restore", snap_id)
    assert rc == 0, err
    assert w.report()["data_ok"]
    w.kill_all()


@pytest.mark.parametrize("setting,private", [(None, 1), ("0", 0)])
def test_page_stream_slots_dump_leaves_running_and_restores(workload, gpusnap, store, setting, private):
    """Real CRIU, the original left running: by default (as root) the stream's slots are
    private to gpusnap (huge pages), each worker reading its slot with process_vm_readv;
    GPUSNAP_STREAM_PRIVATE=0 puts them in shared memory. The dump says which, verify
    re-derives every id, and the restore brings every byte back."""
    w = workload("--mib", "48")
    env = {"GPUSNAP_STREAM_PRIVATE": setting} if setting is not None else {}
    rc, out, err = gpusnap("dump", "--pid", str(w.pid), "--leave-running", env=env)
    assert rc == 0, err
    assert out["timings"]["stream_private"] == private, out
    assert bool(out["timings"].get("stream_w_read")) == bool(private), out
    assert w.report()["data_ok"]                    # the original ran on
    w.kill_all()
    wait_pids_free(w.pids)
    _verified_and_restored(gpusnap, w, out["id"])


def _cgroup(what: str, choices: list[tuple[str, dict[str, str]]]):
    """A new cgroup made at the first base of choices ((base, {file: value}), v1 first)
    where it can be: its cgroup.procs path and a remover; skips where none can be made."""
    for base, files in choices:
        if not os.path.exists(os.path.join(base, "cgroup.procs")):
            continue
        path = os.path.join(base, f"gpusnap-test-{what}-{os.getpid()}")
        try:
            os.mkdir(path)
            for name, value in files.items():
                with open(os.path.join(path, name), "w") as f:
                    f.write(value)
        except OSError:             # no such controller there, or not ours to make
            if os.path.isdir(path):
                os.rmdir(path)
            continue
        return os.path.join(path, "cgroup.procs"), lambda: os.rmdir(path)
    pytest.skip(f"no {what} cgroup can be made here")


def _memory_cgroup(limit: int):
    return _cgroup("memory", [("/sys/fs/cgroup/memory", {"memory.limit_in_bytes": str(limit)}),
                              ("/sys/fs/cgroup", {"memory.max": str(limit)})])


def test_a_leave_running_stream_grows_within_gpusnaps_memory_cgroup(workload, store, tmp_path):
    """gpusnap in a memory cgroup of 768 MiB on a host with far more: the page stream of a
    --leave-running dump grows into a quarter of what the cgroup leaves (hostmem.py), not of
    the host's memory, and the dump restores."""
    import json
    import subprocess
    import sys
    from conftest import REPO
    from gpusnap.store.pagestream import SLOT_BYTES, slot_count
    limit = 768 << 20
    procs, remove = _memory_cgroup(limit)
    w = workload("--mib", "64")
    env = {**os.environ, "GPUSNAP_STORE": store,
           "GPUSNAP_STATE_DIR": os.path.join(os.path.dirname(store), "state")}
    env.pop("GPUSNAP_STREAM_SLOTS", None)
    try:
        proc = subprocess.run(["sh", "-c", f'echo $$ > {procs} && exec "$0" "$@"', sys.executable,
                               "-m", "gpusnap", "--json", "dump", "--pid", str(w.pid), "--leave-running"],
                              cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    finally:
        remove()
    assert proc.returncode == 0, proc.stderr
    timings = json.loads(proc.stdout)["timings"]
    assert timings["stream_slots"] * SLOT_BYTES <= max(limit // 4, slot_count(timings["stream_workers"]) * SLOT_BYTES)
    assert w.report(w.pid)["data_ok"]
    w.kill_all()


def _cpu_cgroup(cpus: int):
    return _cgroup("cpu", [("/sys/fs/cgroup/cpu", {"cpu.cfs_period_us": "100000",
                                                    "cpu.cfs_quota_us": str(cpus * 100000)}),
                           ("/sys/fs/cgroup", {"cpu.max": f"{cpus * 100000} 100000"})])


def test_doctor_sizes_the_workers_from_gpusnaps_cpu_quota(tmp_path):
    """gpusnap in a CPU cgroup with a quota of one CPU: its worker pools are sized from
    that (hostcpu.py), as a pod's CPU limit would have them, and doctor says so."""
    import json
    import subprocess
    import sys
    from conftest import REPO
    procs, remove = _cpu_cgroup(1)
    try:
        proc = subprocess.run(["sh", "-c", f'echo $$ > {procs} && exec "$0" "$@"', sys.executable,
                               "-m", "gpusnap", "--json", "doctor"],
                              cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "GPUSNAP_STORE": str(tmp_path / "store")})
    finally:
        remove()
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert checks["cpus"]["detail"].startswith("1 for gpusnap (of "), checks["cpus"]
    assert "its CPU cgroup's quota" in checks["cpus"]["detail"]
