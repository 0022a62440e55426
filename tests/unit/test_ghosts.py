"""Deleted files a tree holds, and the ghost limit CRIU needs to store them."""

import mmap
import os
import subprocess
import sys

from gpusnap.criu.argv import CriuOptions, dump_argv
from gpusnap.targets import ghosts


def test_the_limit_is_none_until_a_file_is_past_criu_default_then_the_largest_in_mib():
    assert ghosts.ghost_limit([]) is None
    assert ghosts.ghost_limit([100, 1 << 20]) is None
    assert ghosts.ghost_limit([(1 << 20) + 1]) == 2 << 20
    assert ghosts.ghost_limit([5, 34213888, 3 << 20]) == 33 << 20


def test_the_dump_argv_carries_it():
    argv = dump_argv("criu", 1, "/d", CriuOptions(ghost_limit=33 << 20))
    assert argv[argv.index("--ghost-limit") + 1] == str(33 << 20)
    assert "--ghost-limit" not in dump_argv("criu", 1, "/d", CriuOptions())


def test_scan_finds_a_deleted_file_mapped_and_one_held_open_once_each(tmp_path):
    code = f"""
import mmap, os, sys, time
a = os.path.join({str(tmp_path)!r}, "mapped"); b = os.path.join({str(tmp_path)!r}, "open")
with open(a, "wb") as f: f.truncate(3 << 20)
fa = open(a, "r+b"); m = mmap.mmap(fa.fileno(), 0); fa.close(); os.unlink(a)
fb = open(b, "wb"); fb.truncate(5 << 20); fb2 = open(b, "rb"); os.unlink(b)
memfd = os.memfd_create("x"); os.ftruncate(memfd, 9 << 20)
print("ready", flush=True); time.sleep(30)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert sorted(ghosts.scan([p.pid])) == [3 << 20, 5 << 20]     # the memfd is CRIU's own
        assert ghosts.ghost_limit(ghosts.scan([p.pid, 999999999])) == 5 << 20
    finally:
        p.kill()
        p.wait()
