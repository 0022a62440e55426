"""`gpusnap switch`: where IN fits beside OUT (pure). Its refusals that need no CUDA are
in test_parked.py, with suspend's and resume's."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpusnap.engine.switch import MARGIN, lacks_room

GIB = 1 << 30


def _gpu(uuid, free_gib):
    return {"uuid": uuid, "name": "H200", "memory_free": int(free_gib * GIB)}


def test_fits_beside_with_its_weights_and_the_margin():
    need = {"GPU-a": 2 * GIB}
    assert lacks_room(need, 16 * GIB, None, [_gpu("GPU-a", 19.5)]) is None
    why = lacks_room(need, 16 * GIB, None, [_gpu("GPU-a", 18.5)])
    assert why and "GPU-a" in why and "19.0 GiB wanted" in why
    # moved by --gpu: the room that counts is the new GPU's
    assert lacks_room(need, 0, [("GPU-a", "GPU-b")], [_gpu("GPU-a", 0), _gpu("GPU-b", 4)]) is None
    assert lacks_room(need, 0, [("GPU-a", "GPU-b")], [_gpu("GPU-a", 80), _gpu("GPU-b", 2)])
    # a GPU that is not there has no room; nothing held: nothing wanted
    assert lacks_room(need, 0, None, [_gpu("GPU-b", 80)])
    assert lacks_room({"GPU-a": 0}, 16 * GIB, None, []) is None


@given(st.dictionaries(st.sampled_from(["GPU-a", "GPU-b", "GPU-c"]), st.integers(0, 64 * GIB)),
       st.integers(0, 128 * GIB), st.lists(st.integers(0, 200 * GIB), min_size=3, max_size=3))
def test_room_is_what_each_gpu_needs_and_its_share_of_the_weights(need, weights, frees):
    host = [{"uuid": u, "memory_free": f} for u, f in zip(["GPU-a", "GPU-b", "GPU-c"], frees)]
    free = {g["uuid"]: g["memory_free"] for g in host}
    holding = [u for u, n in need.items() if n]
    fits = all(free[u] >= need[u] + weights // len(holding) + MARGIN for u in holding)
    assert (lacks_room(need, weights, None, host) is None) == fits


# ---- the undo's order, with park's halves replaced (the halves themselves run on the GPU
# machine: tests/gpu/test_gpu_park.py) -------------------------------------------------

class _Halves:
    """park's suspend/resume as a log of what ran; fail names the calls that raise."""

    def __init__(self, monkeypatch, fail=()):
        from gpusnap.engine import park
        from gpusnap.errors import CudaFailed
        self.log, self.fail = [], set(fail)

        def run(what, pid):
            self.log.append((what, pid))
            if (what, pid) in self.fail:
                raise CudaFailed(f"{what} {pid} failed")
            return {"pid": pid, "timings": {}, "notes": []}
        monkeypatch.setattr(park, "execute_suspend", lambda plan: run("suspend", plan.pid))
        monkeypatch.setattr(park, "execute_resume", lambda plan: run("resume", plan.pid))
        monkeypatch.setattr(park, "plan_suspend", lambda req: _Plan(req.pid))
        monkeypatch.setattr(park, "plan_resume", lambda req: _Plan(req.pid))


class _Plan:
    def __init__(self, pid, state="suspended"):
        self.pid = pid
        self.target = self
        self.root_pid = pid
        self.entry = {"pid": pid, "state": state, "snapshot": "snap1" if state == "standby" else None,
                      "since": 1.0}


def _switch_plan(overlap: bool, into: int = 2, state: str = "suspended"):
    from gpusnap.engine import park, switch
    req = switch.SwitchRequest(out=park.SuspendRequest(pid=1), into=park.ResumeRequest(pid=into))
    return switch.SwitchPlan(req, _Plan(1), _Plan(into, state), overlap, "test")


@pytest.mark.parametrize("overlap", [True, False])
def test_both_halves_run_and_nothing_is_undone(monkeypatch, overlap):
    from gpusnap.engine import switch
    halves = _Halves(monkeypatch)
    out = switch.execute_switch(_switch_plan(overlap))
    assert sorted(halves.log) == [("resume", 2), ("suspend", 1)]
    assert out["overlapped"] is overlap and set(out["timings"]) >= {"suspend", "resume", "switch"}


@pytest.mark.parametrize("overlap", [True, False])
def test_in_failing_brings_out_back(monkeypatch, overlap):
    from gpusnap.engine import switch
    from gpusnap.errors import CudaFailed
    halves = _Halves(monkeypatch, fail={("resume", 2)})
    with pytest.raises(CudaFailed, match="resume 2"):
        switch.execute_switch(_switch_plan(overlap))
    assert halves.log[-1] == ("resume", 1)          # OUT resumed, last
    assert ("suspend", 2) not in halves.log         # IN stayed parked: nothing to undo


def test_out_failing_parks_in_again_when_it_had_resumed(monkeypatch):
    from gpusnap.engine import switch
    from gpusnap.errors import CudaFailed
    halves = _Halves(monkeypatch, fail={("suspend", 1)})
    with pytest.raises(CudaFailed, match="suspend 1"):
        switch.execute_switch(_switch_plan(True))
    assert halves.log[-1] == ("suspend", 2) and ("resume", 1) not in halves.log


def test_a_standby_parked_again_by_the_undo_is_listed_as_the_standby_it_was(monkeypatch, tmp_path):
    import os

    from gpusnap.engine import parked, switch
    from gpusnap.errors import CudaFailed
    monkeypatch.setenv("GPUSNAP_STATE_DIR", str(tmp_path / "state"))
    me = os.getpid()
    halves = _Halves(monkeypatch, fail={("suspend", 1)})
    with pytest.raises(CudaFailed):
        switch.execute_switch(_switch_plan(True, into=me, state="standby"))
    assert halves.log[-1] == ("suspend", me)
    entry = parked.lookup(me)
    assert entry["state"] == "standby" and entry["snapshot"] == "snap1" and entry["since"] == 1.0
    assert not {"timings", "notes"} & set(entry)


def test_an_undo_that_fails_is_named_in_the_hint(monkeypatch):
    from gpusnap.engine import switch
    from gpusnap.errors import CudaFailed
    _Halves(monkeypatch, fail={("resume", 2), ("resume", 1)})
    with pytest.raises(CudaFailed) as err:
        switch.execute_switch(_switch_plan(False))
    assert "1 stays suspended" in err.value.hint and "gpusnap resume 1" in err.value.hint
