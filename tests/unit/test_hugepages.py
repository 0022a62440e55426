"""cuda/hugepages.py: THP "always" while the driver checkpoints, put back by the last holder,
by its helper when the holder is killed, or by the next holder. A file stands in for the
sysfs knob; the locks, the helper process and SIGKILL are real."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import wait_until
from gpusnap.cuda import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def knob(tmp_path, monkeypatch):
    monkeypatch.delenv("GPUSNAP_HUGE_PAGES", raising=False)
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    state = tmp_path / "state"

    def mode():
        return hugepages.read_mode(str(path))

    def window():
        return hugepages.window(str(path), str(state / "thp"))

    return path, state, mode, window


def test_read_mode_takes_the_bracketed_word(tmp_path):
    p = tmp_path / "e"
    for text, want in [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
                       ("always madvise [never]", "never"), ("garbage", None), ("[bogus]", None),
                       ("madvise\n", "madvise")]:
        p.write_text(text)
        assert hugepages.read_mode(str(p)) == want
    assert hugepages.read_mode(str(tmp_path / "missing")) is None


def test_madvise_becomes_always_for_the_window_and_comes_back(knob):
    path, state, mode, window = knob
    with window() as switched:
        assert switched
        assert path.read_text() == "always"
    assert mode() == "madvise"
    assert not (state / "thp" / "saved").exists()


@pytest.mark.parametrize("start", ["[always] madvise never", "always madvise [never]"])
def test_always_and_never_are_left_alone(knob, start):
    path, state, mode, window = knob
    path.write_text(start)
    with window() as switched:
        assert not switched
        assert path.read_text() == start
    assert path.read_text() == start


def test_off_leaves_the_mode_alone(knob, monkeypatch):
    path, state, mode, window = knob
    monkeypatch.setenv("GPUSNAP_HUGE_PAGES", "off")
    with window() as switched:
        assert not switched
        assert mode() == "madvise"


def test_no_knob_or_no_state_dir_runs_the_body_as_it_is(tmp_path):
    with hugepages.window(str(tmp_path / "nope"), str(tmp_path / "state" / "thp")) as switched:
        assert not switched
    blocker = tmp_path / "file"
    blocker.write_text("")
    knob = tmp_path / "enabled"
    knob.write_text("always [madvise] never")
    with hugepages.window(str(knob), str(blocker / "thp")) as switched:
        assert not switched
    assert hugepages.read_mode(str(knob)) == "madvise"


def test_overlapping_windows_the_last_to_leave_puts_it_back(knob):
    path, state, mode, window = knob
    a = window()
    a.__enter__()
    b = window()
    assert b.__enter__()                     # the second joins: mode already switched
    a.__exit__(None, None, None)
    assert path.read_text() == "always"      # b still inside
    b.__exit__(None, None, None)
    assert mode() == "madvise"


def test_the_body_raising_still_puts_it_back(knob):
    path, state, mode, window = knob
    with pytest.raises(RuntimeError):
        with window():
            raise RuntimeError("driver failed")
    assert mode() == "madvise"


def _holder(path, state, ready):
    """A process inside a window until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from gpusnap.cuda import hugepages
        with hugepages.window({str(path)!r}, {str(state / "thp")!r}) as s:
            open({str(ready)!r}, "w").write(str(s))
            time.sleep(60)
    """)
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_holder_killed_with_sigkill_has_its_helper_put_the_mode_back(knob, tmp_path):
    path, state, mode, window = knob
    ready = tmp_path / "ready"
    proc = _holder(path, state, ready)
    try:
        assert wait_until(ready.exists, 10) and ready.read_text() == "True"
        assert path.read_text() == "always"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert wait_until(lambda: path.read_text() == "madvise", 10)
        assert wait_until(lambda: not (state / "thp" / "saved").exists(), 10)
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_does_not_end_another_holders_window(knob, tmp_path):
    path, state, mode, window = knob
    ready = tmp_path / "ready"
    with window() as switched:
        assert switched
        proc = _holder(path, state, ready)
        try:
            assert wait_until(ready.exists, 10)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            time.sleep(0.3)                     # its helper has left by now
            assert path.read_text() == "always"
        finally:
            proc.kill()
            proc.wait()
    assert mode() == "madvise"


def test_a_mode_left_switched_with_no_holder_is_put_back_by_the_next(knob):
    path, state, mode, window = knob
    (state / "thp").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    (state / "thp" / "saved").write_text("madvise")
    path.write_text("[always] madvise never")      # a holder died with no helper
    with window() as switched:
        assert switched
        assert path.read_text() == "always"
    assert mode() == "madvise"


def test_notes_only_when_switched():
    class S:
        huge_pages = True
    assert "THP" in hugepages.notes(S())[0]
    S.huge_pages = False
    assert hugepages.notes(S()) == [] and hugepages.notes(None) == []


@pytest.mark.parametrize("choice, env, want", [(None, "auto", True), (None, "off", False),
                                               (False, "auto", False), (True, "off", True)])
def test_a_session_passes_its_choice_to_the_window(monkeypatch, choice, env, want):
    """CudaSession(huge_pages=...) decides over GPUSNAP_HUGE_PAGES (the CRIU hook passes
    its config's value and reads no environment for it)."""
    from gpusnap.cuda.driver import CudaState
    from gpusnap.cuda.session import CudaSession

    class Driver:
        states = {7: CudaState.LOCKED}

        def get_state(self, pid):
            return self.states[pid]

        def checkpoint(self, pid):
            self.states[pid] = CudaState.CHECKPOINTED

    seen, dirs = [], []

    @contextlib.contextmanager
    def window(state_dir=None, on=None):
        seen.append(hugepages.enabled() if on is None else on)
        dirs.append(state_dir)
        yield seen[-1]

    monkeypatch.setenv("GPUSNAP_HUGE_PAGES", env)
    monkeypatch.setattr(hugepages, "window", window)
    s = CudaSession([7], Driver(), huge_pages=choice, thp_state="/run/x/thp")
    s.checkpoint_all()
    assert seen == [want] and s.huge_pages is want and dirs == ["/run/x/thp"]
    assert hugepages.wanted(False) is False and hugepages.wanted("auto") is True


def test_a_child_forked_inside_the_window_does_not_hold_it_open(knob):
    """The fill's workers fork inside the window and inherit the helper's pipe: the
    holder's "done" ends the window at once, not their exit."""
    path, state, mode, window = knob
    with window():
        child = os.fork()
        if child == 0:
            time.sleep(5)
            os._exit(0)
        t = time.monotonic()
    try:
        assert time.monotonic() - t < 2             # the window's end did not wait for it
        assert path.read_text() == "madvise"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
