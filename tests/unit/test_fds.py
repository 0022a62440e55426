"""Descriptors that lead outside a process tree (targets/fds.py)."""

from __future__ import annotations

import subprocess
import sys

from gpusnap.targets import fds
from gpusnap.targets.fds import Fd, Proc


def test_classify_pipes_sockets_ttys():
    tree = [10, 11]
    found = fds.classify(
        tree,
        [Fd(10, 0, "/dev/null"), Fd(10, 1, "pipe:[5]"), Fd(11, 3, "pipe:[6]"),
         Fd(11, 4, "socket:[7]"), Fd(10, 2, "/dev/pts/3", rdev=0x8803), Fd(11, 2, "/dev/pts/4", rdev=0x8804)],
        {"pipe:[5]": {10, 99}, "pipe:[6]": {10, 11}, "socket:[7]": {11, 42}},
        {10: Proc(10, 10, 0x8804), 11: Proc(11, 10, 0x8804)})
    assert [(f.pid, f.fd, f.kind, f.holders) for f in found] == [
        (10, 1, "pipe", (99,)), (11, 4, "socket", (42,)), (10, 2, "tty", ())]
    assert "stdout" in found[0].describe() and "99" in found[0].describe()


def test_scan_finds_stdout_piped_to_us():
    """A child whose stdout is a pipe to this process (outside its tree)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        found = fds.scan([child.pid])
        stdout = [f for f in found if f.fd == 1]
        assert stdout and stdout[0].kind == "pipe" and not [f for f in found if f.fd in (0, 2)]
    finally:
        child.kill()
        child.wait()


def test_scan_of_a_tree_with_stdio_on_files_finds_nothing(tmp_path):
    with open(tmp_path / "log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", "import os, time; r, w = os.pipe(); "
                                  "time.sleep(30)"], stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=log, start_new_session=True)
    try:
        assert fds.scan([child.pid]) == []        # a pipe inside the tree is fine
    finally:
        child.kill()
        child.wait()


def test_is_tty():
    assert fds.is_tty("/dev/pts/0") and fds.is_tty("/dev/tty1") and not fds.is_tty("/dev/null")
