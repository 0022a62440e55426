"""A restore's clean-up against scripted fakes (the real CRIU and engines:
tests/integration): a second Ctrl-C (or the daemon dying, after its SIGTERM) while a
failed restore cleans up does not cut it short: the work dir (the images: gigabytes of
tmpfs) goes, and the intent record with its guard is ended."""

from __future__ import annotations

import contextlib
import os
import signal
import types

import pytest

from gpusnap.engine import intent, workdir
from gpusnap.engine.strategies import container, process
from gpusnap.errors import CriuFailed, CudaFailed
from tests.unit.test_dump_retry import Recorded


@pytest.fixture
def second_ctrl_c_at_the_clean_up(tmp_path, monkeypatch):
    """A SIGINT as the work dir is being removed; the dirs removed are listed."""
    monkeypatch.setenv("GPUSNAP_WORKDIR", str(tmp_path / "work"))
    real, removed = workdir.remove, []

    def remove(path):
        os.kill(os.getpid(), signal.SIGINT)
        real(path)
        removed.append(path)
    monkeypatch.setattr(workdir, "remove", remove)
    return removed


@contextlib.contextmanager
def not_cut_short():
    """A KeyboardInterrupt out of the block fails the test (pytest would stop the run)."""
    try:
        yield
    except KeyboardInterrupt:
        pytest.fail("the second signal cut the clean-up short")


def _repo(tmp_path):
    return types.SimpleNamespace(path=str(tmp_path / "store"), shared_lock=contextlib.nullcontext,
                                 prefetch=lambda m, first=(): contextlib.nullcontext())


def test_a_second_signal_does_not_cut_a_process_restores_clean_up(
        tmp_path, monkeypatch, second_ctrl_c_at_the_clean_up):
    guard = Recorded()
    monkeypatch.setattr(intent, "for_restore", lambda snapshot, pids, work: guard)

    def criu_fails(plan, repo, work, stages, progress):
        raise CriuFailed("criu restore failed (exit 1)")
    monkeypatch.setattr(process, "_criu_pages", criu_fails)
    m = types.SimpleNamespace(id="ab" * 8, pids=[4242], files=[], sdk=None, cuda=None, notes=[])
    plan = types.SimpleNamespace(manifest=m, page_path="criu", notes=[],
                                 request=types.SimpleNamespace(standby=False))
    with pytest.raises(CriuFailed), not_cut_short():
        process.ProcessStrategy().restore(plan, _repo(tmp_path), None)
    assert len(second_ctrl_c_at_the_clean_up) == 1
    assert not os.path.exists(second_ctrl_c_at_the_clean_up[0])
    assert guard.ended


class Engine:
    kind = "docker"
    removed: list[str] = []

    def restore(self, facts, materialise, **kwargs):
        return {"pid": 4242, "id": "c0ffee", "name": "n", "created": True}

    def remove(self, ref):
        self.removed.append(ref)


def test_a_second_signal_does_not_cut_a_container_restores_clean_up(
        tmp_path, monkeypatch, second_ctrl_c_at_the_clean_up):
    def cuda_fails(pid, pairs):
        raise CudaFailed("restore failed")
    monkeypatch.setattr(container, "restore_cuda", cuda_fails)
    strategy = object.__new__(container.ContainerStrategy)
    strategy.kind, strategy.engine = "docker", Engine()
    m = types.SimpleNamespace(id="ab" * 8, cuda=object())
    where = types.SimpleNamespace(facts={}, into=None, name="n", devices=None, node_changes=None)
    plan = types.SimpleNamespace(manifest=m, container=where, gpu_pairs=None, notes=[])
    with pytest.raises(CudaFailed), not_cut_short():
        strategy.restore(plan, _repo(tmp_path), None)
    assert strategy.engine.removed == ["c0ffee"]
    assert len(second_ctrl_c_at_the_clean_up) == 1
    assert not os.path.exists(second_ctrl_c_at_the_clean_up[0])


def test_an_interrupt_while_the_intent_is_recorded_still_ends_it(tmp_path, monkeypatch):
    """SIGTERM while for_restore wrote the record and forked its guard: the restore
    keeps it before the signal is raised, and ends it (else its guard 'recovers' a
    restore that never started: a note in gpusnap ps)."""
    monkeypatch.setenv("GPUSNAP_WORKDIR", str(tmp_path / "work"))
    guard = Recorded()

    def for_restore(snapshot, pids, work):
        os.kill(os.getpid(), signal.SIGINT)
        return guard
    monkeypatch.setattr(intent, "for_restore", for_restore)
    m = types.SimpleNamespace(id="ab" * 8, pids=[4242], files=[], sdk=None, cuda=None, notes=[])
    plan = types.SimpleNamespace(manifest=m, page_path="criu", notes=[],
                                 request=types.SimpleNamespace(standby=False))
    with pytest.raises(KeyboardInterrupt):
        process.ProcessStrategy().restore(plan, _repo(tmp_path), None)
    assert guard.ended
    assert os.listdir(tmp_path / "work") == []
