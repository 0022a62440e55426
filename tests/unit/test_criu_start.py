"""A CRIU that gpusnap started is a CRIU it waits for (or stops), even when a Ctrl-C or the
daemon's SIGTERM lands while it starts: Popen waits for the child's exec, and an interrupt
there used to raise out of it, leaving CRIU at work beside gpusnap's undo (a dump that
leaves the tree stopped after the undo resumed it; a restore that makes its tree after
the undo looked for it). A shell stands in for CRIU."""

from __future__ import annotations

import os
import signal
import types

import pytest

from gpusnap.criu import lazy
from gpusnap.criu import runner
from gpusnap.criu.argv import CriuOptions
from gpusnap.engine import pagepath
from gpusnap.engine.timing import Stages
from tests.unit.test_sysrun import interrupted_at_the_start


def test_an_interrupt_while_criu_restore_starts_waits_for_its_pidfile(tmp_path, monkeypatch):
    """The restore's undo kills the tree whose pidfile it finds: CRIU must have ended."""
    monkeypatch.setattr(runner, "restore_argv", lambda criu, images, pidfile, opts, work:
                        ["sh", "-c", f"sleep 0.3; echo 4242 > {pidfile}"])
    interrupted_at_the_start(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        runner.restore(str(tmp_path), CriuOptions(), work_dir=str(tmp_path), criu="criu")
    assert runner.restored_pid(str(tmp_path)) == 4242


def test_an_interrupt_while_a_streaming_dump_starts_waits_for_criu(tmp_path, monkeypatch):
    done = tmp_path / "done"
    monkeypatch.setattr(runner, "dump_argv", lambda *a, **k: ["sh", "-c", f"sleep 0.3; touch {done}"])
    interrupted_at_the_start(monkeypatch)
    served = []
    with pytest.raises(KeyboardInterrupt):
        runner.dump(1, str(tmp_path), CriuOptions(), criu="criu",
                    page_server=lambda sock, alive: served.append(sock))
    assert done.exists(), "CRIU ran to its end before the interrupt was raised"
    assert served == []


class _Guard:
    pids: list[int] = []

    def receive(self, expected, alive=None):
        raise AssertionError("not reached: the interrupt comes first")


def test_an_interrupt_while_a_lazy_restore_starts_stops_criu(tmp_path, monkeypatch):
    """The uffd path: CRIU waits on tasks nobody serves, so it is killed, and reaped."""
    monkeypatch.setattr(runner, "restore_argv", lambda *a: ["sh", "-c", "exec sleep 30"])
    monkeypatch.setattr(lazy.Guard, "start", lambda work, repo, items, late=None: _Guard())
    started = interrupted_at_the_start(monkeypatch)
    plan = types.SimpleNamespace(manifest=types.SimpleNamespace(cuda=None),
                                 criu_options=CriuOptions(), criu_path="criu")
    prep = pagepath.Prepared(str(tmp_path), 1, [], set())
    try:
        with pytest.raises(KeyboardInterrupt):
            pagepath.UffdPages().restore(plan, None, str(tmp_path), prep, Stages(), None)
        assert len(started) == 1 and started[0].returncode is not None, "killed and reaped"
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def test_an_interrupt_while_the_lazy_pages_guard_starts_still_has_it_closed(tmp_path, monkeypatch):
    """The guard is forked and listening: the page path keeps it before the signal is
    raised, so that the restore's undo (abort) closes it and reaps it."""
    guard = _Guard()

    def start(work, repo, items, late=None):
        os.kill(os.getpid(), signal.SIGINT)
        return guard
    monkeypatch.setattr(lazy.Guard, "start", start)
    plan = types.SimpleNamespace(manifest=types.SimpleNamespace(cuda=None),
                                 criu_options=CriuOptions(), criu_path="criu")
    pages = pagepath.UffdPages()
    with pytest.raises(KeyboardInterrupt):
        pages.restore(plan, None, str(tmp_path), pagepath.Prepared(str(tmp_path), 1, [], set()),
                      Stages(), None)
    assert pages.guard is guard


def test_the_page_stream_socket_is_sized_past_the_host_cap_where_root_may(monkeypatch):
    """GPUSNAP_PS_BUFFER_MB=64: buffers past net.core.wmem_max (root), so that CRIU's send
    of a batch need not wait for gpusnap's receive of the one before; by default, and for
    nonsense, the plain 4 MiB ask, capped by the host."""
    import socket
    with open("/proc/sys/net/core/wmem_max") as f:
        cap = int(f.read())

    def sized(env: str | None) -> int:
        if env is None:
            monkeypatch.delenv("GPUSNAP_PS_BUFFER_MB", raising=False)
        else:
            monkeypatch.setenv("GPUSNAP_PS_BUFFER_MB", env)
        a, b = socket.socketpair()
        with a, b:
            runner._size_buffers(a)
            return a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if os.geteuid() == 0:
        assert sized("64") >= 64 << 20                  # the kernel doubles what it is given
    for env in (None, "many", "4"):
        assert sized(env) <= 2 * min(cap, 4 << 20)
