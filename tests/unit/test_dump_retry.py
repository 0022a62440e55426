"""dump.py's answer to a process that starts using the GPU mid-dump: undo exactly, once
more from the lock, then GpuRace. The CUDA side is CudaSession over test_cuda_session's
fake driver, the target a scripted dumper (the real path: tests/gpu/test_gpu_dump_race.py)."""

from __future__ import annotations

import os

import pytest

from gpusnap.cuda.session import CudaSession
from gpusnap.engine import dump as dump_mod
from gpusnap.engine.plans import DumpPlan, DumpRequest
from gpusnap.errors import CriuFailed, GpuRace
from gpusnap.model import CudaFacts, Target
from test_cuda_session import FakeDriver, R, C

DEVICE_VMA = ("(1.0) Error (criu/proc_parse.c:691): Can't handle non-regular mapping on "
              "{pid}'s map 7f0000000000\n")


class World:
    """The tree's pids now, and what happens when: a new CUDA child after the n-th
    checkpoint stage, CRIU failing on the device mapping of a child gone already."""

    def __init__(self, tmp_path, cuda=(10,)):
        self.driver = FakeDriver({pid: R for pid in cuda})
        self.pids = [1, *cuda]
        self.next_pid = 100
        self.spawn_after_checkpoints: set[int] = set()
        self.criu_fails: list[str | None] = []     # per dump: None ok, else a log line
        self.interrupt_on_the_way_out = False       # Ctrl-C once CRIU left the tree stopped
        self.stopped = False
        self.checkpoints = self.dumps = 0
        self.dumpers: list[FakeDumper] = []

    def spawn(self) -> int:
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        self.pids.append(pid)
        self.driver.states[pid] = R
        return pid

    def cuda_pids(self, pids):
        return [p for p in pids if p in self.driver.states]


class FakeDumper:
    stage = "criu_dump"

    def __init__(self, world: World):
        self.world, self.undo_errors = world, []
        world.dumpers.append(self)

    def pids_now(self):
        return list(self.world.pids)

    def dump(self, images, logs, leave_running, pages=None):
        w = self.world
        w.dumps += 1
        failure = w.criu_fails.pop(0) if w.criu_fails else None
        if failure is not None:
            with open(os.path.join(logs, "dump.log"), "w") as f:
                f.write(failure)
            raise CriuFailed(f"criu dump failed (exit 1): {failure.strip()}")
        with open(os.path.join(images, "inventory.img"), "w") as f:
            f.write(str(w.dumps))
        w.stopped = not leave_running
        if w.interrupt_on_the_way_out:
            raise KeyboardInterrupt

    def criu_dir(self, images):
        return images

    def finish(self):
        pass

    def resume(self):
        self.world.stopped = False


class Strategy:
    kind = "process"
    sdk_agents = False

    def __init__(self, world):
        self.world = world

    def dumper(self, plan, cuda=None):
        return FakeDumper(self.world)


@pytest.fixture
def run(tmp_path, monkeypatch):
    """run(world) -> the _Dump, over the world's driver and tree, ready to take images."""
    monkeypatch.setenv("GPUSNAP_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setattr(CudaSession, "describe", lambda s: CudaFacts(pids=list(s.pids)))

    def make(world: World, leave_running: bool = True):
        real_checkpoint = world.driver.checkpoint

        def checkpoint(pid):
            real_checkpoint(pid)
            if pid == max(p for p in world.driver.states if p < 100):     # the stage's last
                world.checkpoints += 1
                if world.checkpoints in world.spawn_after_checkpoints:
                    world.spawn()
        world.driver.checkpoint = checkpoint
        monkeypatch.setattr(dump_mod.gpu, "session", lambda pids: CudaSession(pids, world.driver))
        monkeypatch.setattr(dump_mod.gpu, "cuda_pids", world.cuda_pids)
        target = Target(kind="process", root_pid=1, pids=list(world.pids))
        plan = DumpPlan(request=DumpRequest(pid=1, leave_running=leave_running), target=target,
                        strategy=Strategy(world), criu_path="criu", criu_version="4.2",
                        cuda_pids=world.cuda_pids(world.pids))
        repo = type("Repo", (), {"path": str(tmp_path / "store"), "url": str(tmp_path / "store")})()
        os.makedirs(repo.path, exist_ok=True)
        d = dump_mod._Dump(plan, repo)
        os.makedirs(d.images)
        os.makedirs(d.logs)
        return d
    yield make


def test_a_cuda_child_after_the_checkpoint_means_once_more_over_all_of_them(run, tmp_path):
    w = World(tmp_path)
    w.spawn_after_checkpoints = {1}
    d = run(w)
    facts = d._hold_and_take(d.plan.request)
    assert sorted(facts.pids) == [10, 100]
    assert w.driver.states == {10: C, 100: C}
    # attempt 1 was undone exactly: 10 restored and unlocked before the second lock
    ops = [(op, pid) for op, pid in w.driver.calls]
    assert ops[:4] == [("lock", 10), ("checkpoint", 10), ("restore", 10), ("unlock", 10)]
    assert w.dumps == 1 and len(w.dumpers) == 2     # CRIU ran once, by a new dumper
    assert d.held_since is not None


def test_a_second_race_ends_in_gpu_race_with_everything_running(run, tmp_path):
    w = World(tmp_path)
    w.spawn_after_checkpoints = {1, 2}
    d = run(w)
    with pytest.raises(GpuRace) as info:
        d._hold_and_take(d.plan.request)
    assert info.value.message == ("a process of the tree started using the GPU during the "
                                  "dump: pid 101")
    assert info.value.exit_code == 26
    d.undo(info.value)                              # what execute() does on any error
    assert set(w.driver.states.values()) == {R}
    assert w.dumps == 0                             # CRIU never ran on a racing tree


def test_criu_failing_on_a_gone_childs_gpu_mapping_is_retried(run, tmp_path, monkeypatch):
    w = World(tmp_path)
    w.criu_fails = [DEVICE_VMA.format(pid=4242), None]
    monkeypatch.setattr(dump_mod.cudarace, "_gpu_user_or_gone", lambda pid: True)
    d = run(w)
    d._hold_and_take(d.plan.request)
    assert w.dumps == 2
    assert w.driver.states == {10: C}
    assert [op for op, _ in w.driver.calls] == ["lock", "checkpoint", "restore", "unlock",
                                                "lock", "checkpoint"]
    assert os.listdir(d.images) == ["inventory.img"]    # the first attempt's images went


def test_criu_failing_for_another_reason_is_not_retried(run, tmp_path):
    w = World(tmp_path)
    w.criu_fails = ["(1.0) Error (criu/files.c:1): Can't dump a socket of unknown family\n"]
    d = run(w)
    with pytest.raises(CriuFailed, match="socket"):
        d._hold_and_take(d.plan.request)
    assert w.dumps == 1


def test_an_interrupt_after_criu_left_the_tree_stopped_resumes_it(run, tmp_path):
    """The CI failure of stop 24: SIGTERM reached the daemon's dump child after CRIU had
    left the tree stopped but before the dump returned (its log moved, the stage
    recorded); the undo did not know the tree was stopped and left it so."""
    w = World(tmp_path)
    w.interrupt_on_the_way_out = True
    d = run(w, leave_running=False)
    with pytest.raises(KeyboardInterrupt) as info:
        d._hold_and_take(d.plan.request)
    assert w.stopped
    d.undo(info.value)
    assert not w.stopped
    assert set(w.driver.states.values()) == {R}     # CUDA restored and unlocked too


class Recorded:
    """An intent record with its guard (engine/intent.py), as for_dump and for_restore
    return it."""
    ended = False

    def stage(self, name):
        pass

    def end(self):
        self.ended = True


def test_an_interrupt_while_the_intent_is_recorded_still_ends_it(run, tmp_path, monkeypatch):
    """SIGTERM while for_dump wrote the record and forked its guard: unless the dump
    keeps it before the signal is raised, nothing ends it, and the guard 'recovers' a
    dump that never touched the target (a note in gpusnap ps, the target SIGCONT'd)."""
    import signal
    recorded = Recorded()

    def for_dump(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return recorded
    monkeypatch.setattr(dump_mod.intent, "for_dump", for_dump)
    d = run(World(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        dump_mod.execute(d.plan, d.repo)
    assert recorded.ended


def test_leave_running_resumes_the_original_on_its_own_thread(run, tmp_path):
    """The streamed --leave-running dump: the original's CUDA is restored and unlocked on
    a thread while the store finishes; _resumed() waits for it, and its stages count."""
    import threading
    w = World(tmp_path)
    seen = []
    real_restore = w.driver.restore
    w.driver.restore = lambda pid, pairs=None: (seen.append(threading.current_thread().name),
                                                real_restore(pid, pairs))
    d = run(w)
    d._hold_and_take(d.plan.request)
    d._start_resuming(background=True)
    d._resumed()
    assert w.driver.states == {10: R}
    assert seen and seen[0].startswith("gpusnap-resume")
    assert {"cuda_restore", "cuda_unlock"} <= set(d.stages.seconds)
    assert d.resumed_at is not None and d.resuming is None


def test_a_failed_background_resume_is_raised_before_the_commit(run, tmp_path):
    w = World(tmp_path)
    w.driver.before[("restore", 10)] = CriuFailed("the driver said no")
    d = run(w)
    d._hold_and_take(d.plan.request)
    d._start_resuming(background=True)
    with pytest.raises(CriuFailed, match="said no") as info:
        d._resumed()
    d.undo(info.value)                              # what execute() does
    assert w.driver.states == {10: R}               # rollback restored what the thread left


def test_a_failure_while_resuming_waits_for_it_and_leaves_everything_running(run, tmp_path):
    """The store fails (or Ctrl-C comes) while the thread restores: undo() waits for the
    thread before it rolls back, so the two never drive the same pid at once."""
    import threading
    w = World(tmp_path)
    gate = threading.Event()
    real_restore = w.driver.restore
    w.driver.restore = lambda pid, pairs=None: (gate.wait(5), real_restore(pid, pairs))
    d = run(w)
    d._hold_and_take(d.plan.request)
    d._start_resuming(background=True)
    threading.Timer(0.2, gate.set).start()
    d.undo(KeyboardInterrupt())
    assert d.resuming is None
    assert w.driver.states == {10: R}
    assert [op for op, _ in w.driver.calls].count("restore") == 1
