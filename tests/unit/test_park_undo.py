"""engine/park.py's order and undo against the fake driver of test_cuda_session (the real
driver path is tests/gpu/test_gpu_park.py): a suspend that fails leaves every pid running,
a resume that fails leaves them parked with their entry."""

from __future__ import annotations


import pytest

from gpusnap.model.manifest import CudaFacts
from gpusnap.cuda.session import CudaSession
from gpusnap.engine import gpu, park, parked
from gpusnap.engine.strategies.process import ProcessStrategy
from gpusnap.errors import CudaFailed
from gpusnap.model import Target
from tests.unit.test_cuda_session import C, R, FakeDriver


@pytest.fixture
def pids(tmp_path, monkeypatch, sleeper):
    monkeypatch.setenv("GPUSNAP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(CudaSession, "describe", lambda self: CudaFacts(pids=list(self.pids)))
    return [sleeper().pid for _ in range(2)]


def _use(monkeypatch, driver):
    monkeypatch.setattr(gpu, "session", lambda pids: CudaSession(pids, driver=driver))


def _plan(pids) -> park.SuspendPlan:
    target = Target(kind="process", root_pid=pids[0], pids=pids, name="t")
    return park.SuspendPlan(park.SuspendRequest(pid=pids[0]), target, ProcessStrategy(), pids)


def test_suspend_then_resume(pids, monkeypatch):
    driver = FakeDriver({p: R for p in pids})
    _use(monkeypatch, driver)
    out = park.execute_suspend(_plan(pids))
    assert out["state"] == "suspended" and driver.states == {p: C for p in pids}
    assert parked.lookup(pids[0])["cuda_pids"] == pids
    res = park.execute_resume(park.ResumePlan(park.ResumeRequest(pid=pids[0]),
                                              parked.lookup(pids[0])))
    assert res["was"] == "suspended" and driver.states == {p: R for p in pids}
    assert parked.entries() == []


def test_a_failed_checkpoint_or_record_leaves_every_pid_running(pids, monkeypatch):
    driver = FakeDriver({p: R for p in pids}, before={("checkpoint", pids[1]): CudaFailed("no")})
    _use(monkeypatch, driver)
    with pytest.raises(CudaFailed):
        park.execute_suspend(_plan(pids))
    assert driver.states == {p: R for p in pids} and parked.entries() == []

    def full(entry):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(parked, "record", full)
    with pytest.raises(OSError):
        park.execute_suspend(_plan(pids))
    assert driver.states == {p: R for p in pids}


def test_a_target_someone_else_locked_is_refused_untouched(pids, monkeypatch):
    driver = FakeDriver({pids[0]: R, pids[1]: C})
    _use(monkeypatch, driver)
    with pytest.raises(CudaFailed, match="not RUNNING"):
        park.execute_suspend(_plan(pids))
    assert driver.calls == []


def test_a_failed_resume_leaves_it_parked(pids, monkeypatch):
    driver = FakeDriver({p: R for p in pids})
    _use(monkeypatch, driver)
    park.execute_suspend(_plan(pids))
    driver.before[("unlock", pids[1])] = CudaFailed("unlock failed")
    plan = park.ResumePlan(park.ResumeRequest(pid=pids[0]), parked.lookup(pids[0]))
    with pytest.raises(CudaFailed):
        park.execute_resume(plan)
    assert driver.states == {p: C for p in pids}
    assert parked.lookup(pids[0])["state"] == "suspended"


def test_a_standby_resumed_is_listed_as_restored(pids, monkeypatch):
    driver = FakeDriver({p: C for p in pids})
    _use(monkeypatch, driver)
    parked.record({"pid": pids[0], "pids": pids, "state": "standby", "kind": "process",
                   "cuda_pids": pids, "cuda": None, "sdk": None, "snapshot": "ab" * 32})
    plan = park.ResumePlan(park.ResumeRequest(pid=pids[0]), parked.lookup(pids[0]))
    assert park.execute_resume(plan)["was"] == "standby"
    assert driver.states == {p: R for p in pids}
    assert [(e["pid"], e["state"]) for e in parked.entries()] == [(pids[0], "restored")]


def test_an_interrupt_once_the_entry_is_written_takes_it_back(pids, monkeypatch):
    """A Ctrl-C (or the daemon's SIGTERM) landing after the entry was renamed into place
    (its directory's fsync, the stage recorded): CUDA was rolled back, so the entry must
    not be left saying 'suspended', and the entry that was there before comes back."""
    driver = FakeDriver({p: R for p in pids})
    _use(monkeypatch, driver)
    parked.record({"pid": pids[0], "pids": pids, "state": "restored", "kind": "process"})
    real = parked.record

    def record_then_interrupt(entry):
        real(entry)
        raise KeyboardInterrupt
    monkeypatch.setattr(parked, "record", record_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        park.execute_suspend(_plan(pids))
    assert driver.states == {p: R for p in pids}
    assert [(e["pid"], e["state"]) for e in parked.entries()] == [(pids[0], "restored")]
    parked.forget(pids[0])
    with pytest.raises(KeyboardInterrupt):
        park.execute_suspend(_plan(pids))
    assert parked.entries() == []
