"""export -> import into a fresh store -> restore, with real CRIU."""

from __future__ import annotations

import os
import stat

import pytest

from conftest import wait_pids_free

pytestmark = [pytest.mark.root]


def test_exported_snapshot_restores_from_a_fresh_store(workload, gpusnap, tmp_path):
    w = workload("--mib", "64", "--zero-mib", "32", "--children", "1", "--threads", "1")
    before = w.report()
    rc, dumped, err = gpusnap("dump", "--pid", str(w.pid), "--name", "carry")
    assert rc == 0, err
    w.reap()
    wait_pids_free(w.pids)

    archive = str(tmp_path / "carry.tar")
    rc, out, err = gpusnap("export", "carry", archive)
    assert rc == 0, err
    assert out["id"] == dumped["id"] and stat.S_IMODE(os.stat(archive).st_mode) == 0o600

    other = str(tmp_path / "other-store")
    rc, out, err = gpusnap("--store", other, "import", archive)
    assert rc == 0, err
    assert out["id"] == dumped["id"] and out["chunks_imported"] > 0
    rc, again, err = gpusnap("--store", other, "import", archive)
    assert rc == 0 and again["already_present"], err
    assert gpusnap("--store", other, "verify")[0] == 0

    rc, out, err = gpusnap("--store", other, "restore", "carry")
    assert rc == 0, err
    after = w.report()
    assert after["data_ok"] and after["zeros_ok"] and after["children_ok"], after
    assert after["ticks"] >= before["ticks"]


def test_import_of_a_damaged_archive_fails_with_its_own_exit_code(workload, gpusnap, tmp_path):
    w = workload("--mib", "8")
    rc, dumped, err = gpusnap("dump", "--pid", str(w.pid), "--leave-running")
    assert rc == 0, err
    archive = str(tmp_path / "a.tar")
    assert gpusnap("export", dumped["id"], archive)[0] == 0
    with open(archive, "r+b") as f:
        f.truncate(os.path.getsize(archive) // 2)
    other = str(tmp_path / "other-store")
    rc, out, err = gpusnap("--store", other, "import", archive)
    assert rc == 45 and out["error"] == "ArchiveError", err
    rc, snaps, _ = gpusnap("--store", other, "ls")
    assert snaps == []
