"""Commands that only read work on a store they may not write, and change nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.root


def _store(tmp_path) -> str:
    from gpusnap.model import Manifest, Target
    from gpusnap.store import Repository
    path = str(tmp_path / "store")
    repo = Repository.open(path)
    src = tmp_path / "img"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(300_000))
    from conftest import commit_snapshot
    commit_snapshot(repo, str(src), "ro")
    return path


def _in_read_only_mount(path: str, *gpusnap_args: str) -> list[subprocess.CompletedProcess]:
    """Run each `gpusnap --store path ARGS` with path bind-mounted read-only in a private
    mount namespace (the host's mounts are untouched); $S is the pid of a sleep to dump."""
    runs = " ; ".join(f"{sys.executable} -m gpusnap --store {path} {args} ; echo \"rc=$?\""
                      for args in gpusnap_args)
    script = (f"mount --bind {path} {path} && mount -o remount,bind,ro {path} && "
              f"{{ sleep 60 </dev/null >/dev/null 2>&1 & S=$!; }} && {runs} ; kill $S")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare(1)")
@pytest.mark.parametrize("lock_file", [True, False])
def test_read_commands_on_a_read_only_mount(tmp_path, lock_file):
    path = _store(tmp_path)
    lock = os.path.join(path, "lock")
    if lock_file:
        open(lock, "a").close()
    elif os.path.exists(lock):
        os.unlink(lock)
    res = _in_read_only_mount(path, "--json ls", "inspect ro --json", "verify --json",
                              "dump --pid $S --json", "gc")
    assert "Traceback" not in res.stderr, res.stderr
    outs = res.stdout.split("rc=")
    codes = [int(chunk.split()[0]) for chunk in outs[1:]]
    assert codes[:3] == [0, 0, 0], res.stdout + res.stderr
    assert json.loads(outs[0])[0]["name"] == "ro"
    assert codes[3] == 40 and "read-only" in res.stderr      # refused before the target
    assert codes[4] == 40
    assert os.path.exists(lock) == lock_file                  # nothing created


def test_doctor_mounts_nothing(monkeypatch):
    """doctor asks where the work dir is; only a dump or a restore mounts the tmpfs."""
    from gpusnap.engine import doctor
    from gpusnap.engine import workdir

    def refuse(path):
        raise AssertionError("doctor tried to mount " + path)
    monkeypatch.setattr(workdir, "huge_tmpfs", refuse)
    monkeypatch.delenv("GPUSNAP_WORKDIR", raising=False)
    checks = {c.name: c for c in doctor.run_checks()}
    assert checks["work dir"].status in ("ok", "warn")
    assert "check failed" not in checks["work dir"].detail
