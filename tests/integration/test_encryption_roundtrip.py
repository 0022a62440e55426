"""An encrypted store with real CRIU: dump, verify, export/import, restore; wrong or no key
is refused before the target is touched."""

from __future__ import annotations

import os

import psutil
import pytest

from conftest import wait_pids_free

pytestmark = [pytest.mark.root]


def test_encrypted_store_round_trip(workload, gpusnap, store, tmp_path):
    key, other = str(tmp_path / "store.key"), str(tmp_path / "other.key")
    for path in (key, other):
        assert gpusnap("key", "generate", path)[0] == 0
    enc = {"GPUSNAP_KEY_FILE": key}
    w = workload("--mib", "96", "--children", "1", "--threads", "1")

    rc, snap, err = gpusnap("dump", "--pid", str(w.pid), "--name", "secret", "--leave-running", env=enc)
    assert rc == 0, err
    assert open(os.path.join(store, "config")).read().count("aes-256-gcm") == 1
    rc, report, err = gpusnap("verify", env=enc)
    assert rc == 0 and report["chunks_checked"] > 0 and report["bad"] == [], err

    for env, code in (({}, 46), ({"GPUSNAP_KEY_FILE": other}, 46)):
        rc, out, err = gpusnap("dump", "--pid", str(w.pid), env=env)
        assert rc == code and out["error"] == "WrongKey", err
        assert w.report()["data_ok"], "refused before the target is touched"

    archive = str(tmp_path / "snap.tar")
    assert gpusnap("export", "secret", archive, env=enc)[0] == 0
    second = str(tmp_path / "second")
    rc, out, err = gpusnap("--store", second, "import", archive, env=enc)
    assert rc == 0 and out["id"] == snap["id"], err
    rc, out, err = gpusnap("--store", str(tmp_path / "plain"), "import", archive)
    assert rc == 45 and out["error"] == "ArchiveError", err

    w.kill_all()
    wait_pids_free(w.pids)
    rc, out, err = gpusnap("--store", second, "restore", "secret", env=enc)
    assert rc == 0 and out["pid"] == w.pid, err
    after = w.report()
    assert after["data_ok"] and after["children_ok"] and after["threads_moving"], after
    assert psutil.pid_exists(w.pid)
