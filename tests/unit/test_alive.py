"""The restored tree must still run (engine/alive.py), on real processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from gpusnap.engine import alive
from gpusnap.engine.timing import Stages
from gpusnap.errors import RestoredTreeDied, UsageError
from gpusnap.targets.process import dead


def _zombie(code: str) -> subprocess.Popen:
    """A child that ended and that nobody reaped yet."""
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 10
    while not dead([proc.pid]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def test_a_zombie_root_fails_with_how_it_ended():
    proc = _zombie("raise SystemExit(3)")
    try:
        assert dead([proc.pid]) == {proc.pid: "a zombie, exited with 3"}
        with pytest.raises(RestoredTreeDied) as e:
            alive.check_tree(proc.pid, [proc.pid], "now")
        assert e.value.exit_code == 11 and f"root pid {proc.pid} is a zombie" in e.value.message
    finally:
        proc.wait()


def test_a_signal_is_named_and_a_reaped_pid_is_gone():
    proc = _zombie("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert dead([proc.pid]) == {proc.pid: "a zombie, killed by SIGTERM"}
    proc.wait()
    assert dead([proc.pid]) == {proc.pid: "gone"}


def test_a_live_tree_passes_after_the_settle_window(monkeypatch):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        monkeypatch.setenv("GPUSNAP_SETTLE_MS", "20")
        stages = Stages()
        alive.settle_and_check(proc.pid, [proc.pid], stages)
        assert stages.seconds["settle"] >= 0.02
    finally:
        proc.kill()
        proc.wait()


def test_the_window_counts_from_when_the_tree_ran_again(monkeypatch):
    """A tree that has run for the window already (an SDK agent read its weights back)
    is looked at without waiting; one that ran for part of it waits for the rest."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        monkeypatch.setenv("GPUSNAP_SETTLE_MS", "2000")
        stages = Stages()
        alive.settle_and_check(proc.pid, [proc.pid], stages, running_since=time.monotonic() - 10)
        assert stages.seconds["settle"] < 1.0
        stages = Stages()
        alive.settle_and_check(proc.pid, [proc.pid], stages, running_since=time.monotonic() - 1.5)
        assert 0.4 <= stages.seconds["settle"] < 1.9
    finally:
        proc.kill()
        proc.wait()


def test_a_tree_that_dies_within_the_window_fails(monkeypatch):
    proc = subprocess.Popen([sys.executable, "-c",
                             "import time; time.sleep(0.2); raise SystemExit(2)"])
    try:
        alive.check_tree(proc.pid, [proc.pid], "now")          # alive yet
        monkeypatch.setenv("GPUSNAP_SETTLE_MS", "1500")
        with pytest.raises(RestoredTreeDied) as e:
            alive.settle_and_check(proc.pid, [proc.pid], Stages())
        assert e.value.message.endswith(f"1500 ms after it ran again: root pid {proc.pid} "
                                        f"is a zombie, exited with 2")
    finally:
        proc.wait()


def test_settle_window_default_and_bad_values(monkeypatch):
    monkeypatch.delenv("GPUSNAP_SETTLE_MS", raising=False)
    assert alive.settle_seconds() == 0.1
    monkeypatch.setenv("GPUSNAP_SETTLE_MS", "0")
    assert alive.settle_seconds() == 0
    monkeypatch.setenv("GPUSNAP_SETTLE_MS", "soon")
    with pytest.raises(UsageError):
        alive.settle_seconds()
