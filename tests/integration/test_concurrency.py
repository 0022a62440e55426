"""Two dumps and gc at once: the locks keep every committed chunk, the store verifies clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, wait_pids_free

pytestmark = [pytest.mark.root]


def _cli(store: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpusnap", "--json", "--store", store, *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(proc: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, json.loads(out) if out.strip() else None, err


def test_two_concurrent_dumps_and_gc_leave_a_store_that_verifies_and_restores(workload, gpusnap, store):
    a = workload("--mib", "64", "--children", "1", name="a")
    b = workload("--mib", "48", "--seed", "9", name="b")
    # A removed snapshot of a: its chunks are dead, and the new dump of a will find them in
    # the store and not write them again. gc must not delete them under that dump.
    rc, old, err = gpusnap("dump", "--pid", str(a.pid), "--leave-running")
    assert rc == 0, err
    assert gpusnap("rm", old["id"])[0] == 0

    dumps = [_cli(store, "dump", "--pid", str(w.pid), "--leave-running", "--name", n)
             for w, n in ((a, "snap-a"), (b, "snap-b"))]
    gcs = [_cli(store, "gc") for _ in range(3)]
    results = [_done(p) for p in dumps + gcs]
    for rc, out, err in results:
        assert rc == 0, err

    rc, report, err = gpusnap("verify")
    assert rc == 0 and report["bad"] == [] and report["snapshots"] == 2, report
    assert gpusnap("gc")[0] == 0
    assert gpusnap("verify")[0] == 0

    for w, name in ((a, "snap-a"), (b, "snap-b")):
        w.kill_all()
        wait_pids_free(w.pids)
        rc, out, err = gpusnap("restore", name)
        assert rc == 0, err
        assert w.report()["data_ok"]
    assert not os.listdir(os.path.join(store, "tmp"))
