"""A work dir that fills up during materialise: exit 44 naming where, never SIGBUS (rc 135),
and never "a worker died (killed for memory?)" when the workers do the writing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")

_MATERIALISE = textwrap.dedent("""
    import sys
    from gpusnap.errors import GpusnapError
    from gpusnap.store import Repository, parallel
    parallel.BATCH_BYTES = 1 << 20                 # several batches: worker processes
    repo = Repository.open(sys.argv[1])
    files, _ = repo.ingest_dir(sys.argv[2])
    from gpusnap.model import Manifest, Target
    try:
        repo.materialise(Manifest(target=Target("process", 1, [1]), pids=[1], files=files), sys.argv[3])
    except GpusnapError as exc:
        print(type(exc).__name__, exc.message, file=sys.stderr)
        sys.exit(exc.exit_code)
""")


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "gpusnap-test", str(mnt)],
                   check=True)
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_full_work_dir_is_exit_44_naming_it(tmp_path, small_tmpfs, threads):
    img = tmp_path / "img"
    img.mkdir()
    (img / "pages-1.img").write_bytes(os.urandom(6 << 20))
    dest = os.path.join(small_tmpfs, "restore-x", "images")
    res = subprocess.run([sys.executable, "-c", _MATERIALISE, str(tmp_path / "store"), str(img), dest],
                         capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "GPUSNAP_THREADS": threads})
    assert res.returncode == 44, (res.returncode, res.stderr[-2000:])
    assert "StoreFull" in res.stderr and small_tmpfs in res.stderr
    assert "killed for memory" not in res.stderr
