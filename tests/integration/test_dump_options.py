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
    w.reap()
    wait_pids_free(w.pids)
    assert not os.listdir(os.path.join(store, "tmp"))
    rc, ver, err = gpusnap("verify", out["id"])
    assert rc == 0, err
    rc, res, err = gpusnap("restore", out["id"])
    assert rc == 0, err
    assert w.report()["data_ok"]
    w.kill_all()
