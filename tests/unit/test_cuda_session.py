"""CudaSession's state machine and rollback, against a fake driver that follows the
documented CUprocessState transitions."""

from __future__ import annotations

import os
import signal

import pytest

from gpusnap.cuda.driver import CudaState
from gpusnap.cuda.session import CudaSession, steps_between
from gpusnap.errors import CudaFailed

R, L, C, F = CudaState.RUNNING, CudaState.LOCKED, CudaState.CHECKPOINTED, CudaState.FAILED
MOVES = {"lock": (R, L), "checkpoint": (L, C), "restore": (C, L), "unlock": (L, R)}


@pytest.fixture(autouse=True)
def _one_pid_at_a_time(monkeypatch):
    """The exact call orders below are those of the serial stages; the parallel ones
    have tests of their own (test_parallel_*)."""
    monkeypatch.setenv("GPUSNAP_CUDA_PARALLEL", "0")


class FakeDriver:
    """before[(op, pid)] is raised before the call moves the state, after[(op, pid)] once
    it has (a Ctrl-C landing just after the driver returned)."""

    def __init__(self, states, before=None, after=None):
        self.states = dict(states)
        self.before, self.after = dict(before or {}), dict(after or {})
        self.calls: list[tuple[str, int]] = []
        self.pairs: list = []

    def get_state(self, pid):
        return self.states[pid]

    def _op(self, op, pid):
        self.calls.append((op, pid))
        if (op, pid) in self.before:
            raise self.before.pop((op, pid))
        src, dst = MOVES[op]
        if self.states[pid] != src:
            raise CudaFailed(f"{op}: pid {pid} is {self.states[pid].name}")
        self.states[pid] = dst
        if (op, pid) in self.after:
            exc = self.after.pop((op, pid))
            if callable(exc):
                exc()
            else:
                raise exc

    def lock(self, pid, timeout_ms=0):
        self._op("lock", pid)

    def checkpoint(self, pid):
        self._op("checkpoint", pid)

    def restore(self, pid, pairs=None):
        self.pairs.append(pairs)
        self._op("restore", pid)

    def unlock(self, pid):
        self._op("unlock", pid)


def test_steps_between():
    assert steps_between(R, R) == []
    assert steps_between(R, L) == ["lock"]
    assert steps_between(R, C) == ["lock", "checkpoint"]
    assert steps_between(L, C) == ["checkpoint"]
    assert steps_between(C, L) == ["restore"]
    assert steps_between(C, R) == ["restore", "unlock"]
    assert steps_between(L, R) == ["unlock"]


def test_full_dump_cycle_and_timings():
    d = FakeDriver({1: R, 2: R})
    with CudaSession([1, 2], d) as s:
        s.lock_all(500)
        s.checkpoint_all()
        s.restore_all()
        s.unlock_all()
    assert d.states == {1: R, 2: R}
    assert [c[0] for c in d.calls] == ["lock"] * 2 + ["checkpoint"] * 2 + ["restore"] * 2 + \
        ["unlock"] * 2
    assert set(s.timings) == {"lock", "checkpoint", "restore", "unlock"}
    assert all(t >= 0 for t in s.timings.values())


def test_normal_exit_does_not_roll_back():
    d = FakeDriver({1: R})
    with CudaSession([1], d) as s:
        s.lock_all()
        s.checkpoint_all()
    assert d.states[1] is C and s.state[1] is C


def test_rollback_from_running_does_nothing():
    d = FakeDriver({1: R})
    s = CudaSession([1], d)
    assert s.rollback() == [] and d.calls == []


def test_rollback_from_locked_unlocks():
    d = FakeDriver({1: R})
    s = CudaSession([1], d)
    s.lock_all()
    assert s.rollback() == []
    assert d.calls[-1] == ("unlock", 1) and d.states[1] is R


def test_rollback_from_checkpointed_restores_all_before_unlocking_any():
    d = FakeDriver({1: R, 2: R, 3: R})
    s = CudaSession([1, 2, 3], d)
    s.lock_all()
    s.checkpoint_all()
    d.calls.clear()
    assert s.rollback() == []
    assert d.calls == [("restore", 1), ("restore", 2), ("restore", 3),
                       ("unlock", 1), ("unlock", 2), ("unlock", 3)]
    assert d.pairs[-3:] == [None, None, None]
    assert set(d.states.values()) == {R} and "rollback" in s.timings


def test_started_locked_is_left_locked():
    d = FakeDriver({1: L, 2: R})
    s = CudaSession([1, 2], d)
    s.lock_all()
    assert d.calls == [("lock", 2)]
    s.checkpoint_all()
    s.rollback()
    assert d.states == {1: L, 2: R}


def test_started_checkpointed_is_left_checkpointed():
    d = FakeDriver({1: C})
    s = CudaSession([1], d)
    s.lock_all()
    s.checkpoint_all()
    assert d.calls == []
    s.rollback()
    assert d.calls == [] and d.states[1] is C


def test_restore_path_passes_pairs_and_rolls_forward_to_checkpointed():
    pairs = [("GPU-a", "GPU-b"), ("GPU-b", "GPU-a")]
    d = FakeDriver({1: C, 2: C})
    s = CudaSession([1, 2], d)
    s.restore_all(pairs)
    s.unlock_all()
    assert d.pairs == [pairs, pairs] and d.states == {1: R, 2: R}
    d.calls.clear()
    s.rollback()
    assert d.calls == [("lock", 1), ("lock", 2), ("checkpoint", 1), ("checkpoint", 2)]
    assert d.states == {1: C, 2: C}


def test_lock_timeout_midway_rolls_back_the_locked_ones():
    d = FakeDriver({1: R, 2: R, 3: R}, before={("lock", 2): CudaFailed("timeout")})
    with pytest.raises(CudaFailed, match="timeout"):
        with CudaSession([1, 2, 3], d) as s:
            s.lock_all(100)
    assert d.calls == [("lock", 1), ("lock", 2), ("unlock", 1)]
    assert d.states == {1: R, 2: R, 3: R}
    assert s.state == {1: R, 2: R, 3: R}


@pytest.mark.parametrize("when", ["before", "after"])
def test_ctrl_c_mid_checkpoint_undoes_exactly_what_was_done(when):
    d = FakeDriver({1: R, 2: R, 3: R}, **{when: {("checkpoint", 2): KeyboardInterrupt()}})
    with pytest.raises(KeyboardInterrupt):
        with CudaSession([1, 2, 3], d) as s:
            s.lock_all()
            s.checkpoint_all()
    assert d.states == {1: R, 2: R, 3: R}
    restored = [pid for op, pid in d.calls if op == "restore"]
    assert restored == ([1] if when == "before" else [1, 2])
    assert [pid for op, pid in d.calls if op == "unlock"] == [1, 2, 3]


def test_rollback_collects_errors_and_carries_on():
    d = FakeDriver({1: R, 2: R})
    s = CudaSession([1, 2], d)
    s.lock_all()
    s.checkpoint_all()
    d.before[("restore", 1)] = CudaFailed("restore broke")
    d.before[("unlock", 2)] = OSError("odd")
    errors = s.rollback()
    assert [e.message for e in errors] == ["restore broke", "pid 2: unlock: odd"]
    assert all(isinstance(e, CudaFailed) for e in errors)
    assert ("unlock", 1) not in d.calls         # its restore failed: no unlock attempted
    assert d.states == {1: C, 2: L}
    assert s.errors == errors


def test_rollback_reports_failed_processes_and_rolls_back_the_rest():
    d = FakeDriver({1: R, 2: R})
    s = CudaSession([1, 2], d)
    s.lock_all()
    s.checkpoint_all()
    d.states[1] = F
    errors = s.rollback()
    assert len(errors) == 1 and "FAILED" in errors[0].message
    assert d.states == {1: F, 2: R}


def test_rollback_is_idempotent():
    d = FakeDriver({1: R})
    s = CudaSession([1], d)
    s.lock_all()
    s.rollback()
    n = len(d.calls)
    s.rollback()
    assert len(d.calls) == n


def test_ctrl_c_during_rollback_is_held_off():
    def press_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)

    d = FakeDriver({1: R, 2: R}, after={("restore", 1): press_ctrl_c})
    s = CudaSession([1, 2], d)
    s.lock_all()
    s.checkpoint_all()
    assert s.rollback() == []
    assert d.states == {1: R, 2: R}
    assert s.rollback_interrupted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_released_pids_are_left_alone():
    d = FakeDriver({1: R, 2: R})
    s = CudaSession([1, 2], d)
    s.lock_all()
    s.checkpoint_all()
    s.release([1])
    s.rollback()
    assert d.states == {1: C, 2: R}


def test_order_is_enforced():
    d = FakeDriver({1: R, 2: C})
    s = CudaSession([1, 2], d)
    with pytest.raises(CudaFailed, match="cannot checkpoint pid 1: it is RUNNING") as info:
        s.checkpoint_all()
    assert info.value.hint == "lock it first"
    with pytest.raises(CudaFailed, match="cannot unlock pid 2: it is CHECKPOINTED") as info:
        s.unlock_all()
    assert info.value.hint == "restore it first"
    assert d.calls == []


def test_failed_starting_state_is_refused():
    with pytest.raises(CudaFailed, match="FAILED"):
        CudaSession([1], FakeDriver({1: F}))


def test_duplicate_pids_are_handled_once():
    d = FakeDriver({1: R})
    s = CudaSession([1, 1], d)
    s.lock_all()
    assert d.calls == [("lock", 1)]


def test_describe_records_what_a_restore_needs(monkeypatch):
    from gpusnap.cuda import discover
    gpus = [discover.GpuInfo(i, f"GPU-{i}", "NVIDIA H100 80GB HBM3", 80, 70, "", i)
            for i in range(2)]
    procs = [discover.GpuProcess(1, "GPU-0", 5), discover.GpuProcess(9, "GPU-1", 7)]
    host = discover.HostGpus("580.159.04", 13000, gpus, procs)
    monkeypatch.setattr(discover, "host_gpus", lambda: host)
    monkeypatch.setattr(discover, "_environ_value", lambda pid, key: None)
    facts = CudaSession([1, 2], FakeDriver({1: R, 2: L})).describe()
    assert facts.pids == [1, 2] and facts.states == {"1": "RUNNING", "2": "LOCKED"}
    assert [g["uuid"] for g in facts.gpus] == ["GPU-0", "GPU-1"]
    assert facts.used_memory == {"GPU-0": 5}
    assert facts.driver_version == "580.159.04"


class SlowDriver(FakeDriver):
    """Each call takes `delay` seconds and records how many ran at once."""

    def __init__(self, states, delay=0.2, **kw):
        super().__init__(states, **kw)
        import threading
        self.delay, self.running, self.most = delay, 0, 0
        self.mutex = threading.Lock()

    def _op(self, op, pid):
        import time
        with self.mutex:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            super()._op(op, pid)
        finally:
            with self.mutex:
                self.running -= 1


def test_parallel_stages_call_the_driver_for_every_pid_at_once(monkeypatch):
    import time
    monkeypatch.setenv("GPUSNAP_CUDA_PARALLEL", "1")
    d = SlowDriver({1: R, 2: R, 3: R}, delay=0.3)
    s = CudaSession([1, 2, 3], d)
    start = time.monotonic()
    s.lock_all()
    s.checkpoint_all()
    assert time.monotonic() - start < 1.2       # two stages of 0.3 s, not six calls
    assert d.most == 3
    assert s.state == d.states == {1: C, 2: C, 3: C}
    s.restore_all()
    s.unlock_all()
    assert d.states == {1: R, 2: R, 3: R}


def test_parallel_failure_waits_for_the_others_and_undo_is_exact(monkeypatch):
    monkeypatch.setenv("GPUSNAP_CUDA_PARALLEL", "1")
    d = SlowDriver({1: R, 2: R, 3: R}, delay=0.1,
                   before={("checkpoint", 2): CudaFailed("checkpoint 2 broke")})
    with pytest.raises(CudaFailed, match="checkpoint 2 broke"):
        with CudaSession([1, 2, 3], d) as s:
            s.lock_all()
            s.checkpoint_all()
    assert d.most == 3
    assert sorted(pid for op, pid in d.calls if op == "restore") == [1, 3]
    assert sorted(pid for op, pid in d.calls if op == "unlock") == [1, 2, 3]
    assert d.states == {1: R, 2: R, 3: R}


def test_parallel_ctrl_c_is_held_until_every_call_returned(monkeypatch):
    monkeypatch.setenv("GPUSNAP_CUDA_PARALLEL", "1")

    def press_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)

    d = SlowDriver({1: R, 2: R}, delay=0.2, after={("checkpoint", 1): press_ctrl_c})
    with pytest.raises(KeyboardInterrupt):
        with CudaSession([1, 2], d) as s:
            s.lock_all()
            s.checkpoint_all()
    # both checkpoints finished before the interrupt was acted on; both undone
    assert sorted(pid for op, pid in d.calls if op == "restore") == [1, 2]
    assert d.states == {1: R, 2: R}
