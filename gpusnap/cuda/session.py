"""The per-pid CUDA state machine, with rollback (after CRIU's plugins/cuda/cuda_plugin.c).

Each pid's starting state is recorded when the session opens. The forward steps skip a
pid already where the step leads (a process someone else left locked stays locked), and
rollback() walks every pid back to where it started along

    RUNNING -lock-> LOCKED -checkpoint-> CHECKPOINTED -restore-> LOCKED -unlock-> RUNNING

one stage at a time across all pids (every restore before any unlock), so that processes
that talk to each other (NCCL ranks) never run while a peer is still off the GPU.

A forward stage with several pids calls the driver for all of them at once, one thread a
pid (ctypes lets go of the GIL during the call; the driver serves different processes
independently), and waits for every call before it returns or raises: GPU memory of
several processes is copied out or back in parallel. GPUSNAP_CUDA_PARALLEL=0 runs them
one pid at a time, stopping at the first failure (to compare, or where a driver would
not take concurrent calls). Either way, the session then holds each pid's state as the
driver reports it, because a failed or interrupted call may or may not have moved it.
A Ctrl-C cannot land inside a driver call (Python runs handlers between bytecodes, and
a parallel stage holds it until every thread has returned), only between calls, so
re-reading the state is enough to undo exactly what was done. Rollback runs one pid at
a time.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from gpusnap import interrupts
from gpusnap.cuda import hugepages
from gpusnap.cuda.driver import CudaDriver, CudaState, get_driver
from gpusnap.errors import CudaFailed, GpusnapError
from gpusnap.model import CudaFacts

_LINE = (CudaState.RUNNING, CudaState.LOCKED, CudaState.CHECKPOINTED)
_UP = ("lock", "checkpoint")
_DOWN = ("restore", "unlock")
_ROLLBACK_ORDER = ("restore", "unlock", "lock", "checkpoint")


def parallel_enabled() -> bool:
    """Whether a stage calls the driver for its pids at once (GPUSNAP_CUDA_PARALLEL, on
    unless "0")."""
    return os.environ.get("GPUSNAP_CUDA_PARALLEL", "1").strip() != "0"


def steps_between(current: CudaState, target: CudaState) -> list[str]:
    """The driver calls that take a process from current to target."""
    i, j = _LINE.index(current), _LINE.index(target)
    if j > i:
        return list(_UP[i:j])
    return list(_DOWN[2 - i:2 - j])


class CudaSession:
    """Locks, checkpoints, restores and unlocks a set of CUDA pids, and can put every
    one of them back as it found it. As a context manager it rolls back on any
    exception, KeyboardInterrupt included, and lets the exception propagate."""

    def __init__(self, pids, driver: CudaDriver | None = None, huge_pages: bool | None = None,
                 thp_state: str | None = None):
        """huge_pages: whether checkpoint_all switches the host's THP mode (hugepages.py;
        None: GPUSNAP_HUGE_PAGES decides); thp_state: its state directory (None: under
        GPUSNAP_STATE_DIR)."""
        self.pids = list(dict.fromkeys(pids))
        self._thp, self._thp_state = huge_pages, thp_state
        self.driver = driver or get_driver()
        self.initial: dict[int, CudaState] = {}
        for pid in self.pids:
            state = self.driver.get_state(pid)
            if state not in _LINE:
                raise CudaFailed(f"pid {pid} is in CUDA state {state.name}; "
                                 f"gpusnap cannot start from there")
            self.initial[pid] = state
        self.state = dict(self.initial)
        self.timings: dict[str, float] = {}
        self.errors: list[GpusnapError] = []
        self.rollback_interrupted = False
        self.huge_pages = False
        self._released: set[int] = set()

    def __enter__(self) -> CudaSession:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        return False

    # forward steps

    def lock_all(self, timeout_ms: int = 0) -> None:
        self._stage("lock", CudaState.RUNNING, CudaState.LOCKED,
                    lambda pid: self.driver.lock(pid, timeout_ms))

    def checkpoint_all(self) -> None:
        """Checkpoint every locked pid, with the host's huge pages on for the driver's
        staging memory meanwhile (hugepages.py; self.huge_pages says whether they were)."""
        self._require("checkpoint", CudaState.RUNNING, "lock it first")
        with hugepages.window(state_dir=self._thp_state, on=self._thp) as self.huge_pages:
            self._stage("checkpoint", CudaState.LOCKED, CudaState.CHECKPOINTED,
                        self.driver.checkpoint)

    def restore_all(self, pairs: list[tuple[str, str]] | None = None) -> None:
        """pairs: (snapshot GPU UUID, host GPU UUID) for every GPU, or None to restore
        onto the same GPUs (see gpusnap.remap)."""
        self._stage("restore", CudaState.CHECKPOINTED, CudaState.LOCKED,
                    lambda pid: self.driver.restore(pid, pairs))

    def unlock_all(self) -> None:
        self._require("unlock", CudaState.CHECKPOINTED, "restore it first")
        self._stage("unlock", CudaState.LOCKED, CudaState.RUNNING, self.driver.unlock)

    def describe(self) -> CudaFacts:
        """What a snapshot's manifest keeps of the CUDA side, taken before anything is
        touched: the pids and their starting states, the driver, the GPUs the processes
        could see (a restore onto other GPUs must map every one: see gpusnap.remap), and
        the device memory they hold on each (what the restore will need free there)."""
        from gpusnap.cuda.discover import host_gpus, visible_gpus
        host = host_gpus()
        return CudaFacts(pids=list(self.pids),
                         states={str(pid): state.name for pid, state in self.initial.items()},
                         driver_version=host.driver_version,
                         cuda_driver_version=host.cuda_driver_version,
                         gpus=[g.to_dict() for g in visible_gpus(host.gpus, self.pids)],
                         used_memory=host.used_memory(self.pids))

    def release(self, pids=None) -> None:
        """Stop answering for these pids (all by default): rollback leaves them alone,
        e.g. once CRIU has dumped and killed them."""
        self._released.update(self.pids if pids is None else pids)

    # rollback

    def rollback(self) -> list[GpusnapError]:
        """Bring every pid back to its starting state. Never raises: what could not be
        undone is collected in self.errors (and returned). Ctrl-C and SIGTERM are held off
        meanwhile (self.rollback_interrupted says whether one came)."""
        with interrupts.shielded() as shield:
            start = time.monotonic()
            plans = {}
            for pid in self.pids:
                if pid in self._released:
                    continue
                state = self._refresh(pid)
                if state not in _LINE:
                    self.errors.append(CudaFailed(
                        f"pid {pid} is in CUDA state {state.name}; it cannot be brought back "
                        f"to {self.initial[pid].name}"))
                    continue
                plans[pid] = steps_between(state, self.initial[pid])
            for step in _ROLLBACK_ORDER:
                for pid, plan in plans.items():
                    if plan and plan[0] == step:
                        try:
                            self._do(step, pid)
                            plan.pop(0)
                        except Exception as e:
                            self.errors.append(e if isinstance(e, GpusnapError)
                                               else CudaFailed(f"pid {pid}: {step}: {e}"))
                            self._refresh(pid)
                            plan.clear()
            self.timings["rollback"] = self.timings.get("rollback", 0.0) + (
                time.monotonic() - start)
        self.rollback_interrupted = self.rollback_interrupted or shield.interrupted
        return self.errors

    # internals

    def _do(self, step: str, pid: int) -> None:
        if step == "lock":
            self.driver.lock(pid, 0)
            self.state[pid] = CudaState.LOCKED
        elif step == "checkpoint":
            self.driver.checkpoint(pid)
            self.state[pid] = CudaState.CHECKPOINTED
        elif step == "restore":
            self.driver.restore(pid, None)
            self.state[pid] = CudaState.LOCKED
        else:
            self.driver.unlock(pid)
            self.state[pid] = CudaState.RUNNING

    def _require(self, stage: str, bad: CudaState, hint: str) -> None:
        for pid in self._active():
            if self.state[pid] == bad:
                raise CudaFailed(f"cannot {stage} pid {pid}: it is {bad.name}", hint=hint)

    def _active(self) -> list[int]:
        return [pid for pid in self.pids if pid not in self._released]

    def _stage(self, stage: str, source: CudaState, target: CudaState, call) -> None:
        start = time.monotonic()
        pids = [pid for pid in self._active() if self.state[pid] == source]
        try:
            if len(pids) > 1 and parallel_enabled():
                self._at_once(pids, target, call)
            else:
                for pid in pids:
                    self._step(pid, target, call)
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + (time.monotonic() - start)

    def _step(self, pid: int, target: CudaState, call) -> None:
        try:
            call(pid)
        except BaseException:
            self._refresh(pid)
            raise
        self.state[pid] = target

    def _at_once(self, pids: list[int], target: CudaState, call) -> None:
        """_step for every pid, each on its own thread; returns once all have returned
        (a Ctrl-C meanwhile is held until then), raising the first pid's failure."""
        with interrupts.held(), ThreadPoolExecutor(len(pids), "gpusnap-cuda") as pool:
            futures = [pool.submit(self._step, pid, target, call) for pid in pids]
            failures = [f.exception() for f in futures]
        first = next((e for e in failures if e is not None), None)
        if first is not None:
            raise first

    def _refresh(self, pid: int) -> CudaState:
        try:
            self.state[pid] = self.driver.get_state(pid)
        except Exception:
            pass    # keep what we last knew; rollback reports the call that then fails
        return self.state[pid]
