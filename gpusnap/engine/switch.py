"""Switch a GPU from one target to another: suspend OUT, resume IN (engine/park.py's two
halves), as one operation that is all or nothing.

Planned before anything is touched: OUT's suspend (plan_suspend's refusals) and IN's
resume (plan_resume's, and the GPUs it goes to). IN's plan is made first with the GPUs as
they are; where they have no room for it while OUT holds its memory, again with OUT's
device memory counted as free (GpuMismatch there: refused, nothing touched).

Overlapped or in turn:
    overlapped  IN fits on its GPUs beside OUT: what it held there when it was parked,
                its SDK agents' weights (read back after the restore), and MARGIN for
                each, within NVML's free memory now. IN's resume runs on a thread while
                OUT suspends on the main one (where Ctrl-C lands): the switch takes the
                longer of the two, not their sum.
    in turn     otherwise, or --sequential: OUT is suspended, then IN resumed.

Undo (each half undoes itself first, as suspend and resume always do):
    OUT's suspend fails   IN, if its resume went through meanwhile, is suspended again
    IN's resume fails     (IN is parked as it was) OUT is resumed
An undo that fails is named in the error's hint with what to run by hand.

With a second thread running, OUT's checkpoint sets the huge-page mode without forking
its guard (cuda/hugepages.py): a gpusnap killed with SIGKILL mid-checkpoint leaves the
mode to the next checkpoint on the host to put back.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .. import interrupts
from ..errors import GpuMismatch, GpusnapError, UsageError
from ..model.fields import Fields
from ..model.manifest import CudaFacts
from . import gpu, park, parked

MARGIN = 1 << 30        # per GPU, besides what IN needs: contexts, allocator slack


@dataclass
class SwitchRequest:
    out: park.SuspendRequest
    into: park.ResumeRequest
    sequential: bool = False


@dataclass
class SwitchPlan:
    request: SwitchRequest
    suspend: park.SuspendPlan
    resume: park.ResumePlan | None      # None: planned again once OUT is suspended
    overlap: bool
    reason: str                         # why overlapped or in turn
    planned_s: float = 0.0


def plan_switch(req: SwitchRequest) -> SwitchPlan:
    started = time.perf_counter()
    entry = park.parked_entry(req.into)
    if req.out.pid == entry["pid"] or (req.out.container and req.out.container == req.into.container):
        raise UsageError("switch needs two targets: OUT and IN name the same one")
    try:        # first: its cuInit (on a thread) overlaps the suspend's planning
        r_plan, tight = park.plan_resume(req.into), None
    except GpuMismatch as e:
        r_plan, tight = None, e
    s_plan = park.plan_suspend(req.out)
    if s_plan.target.root_pid == entry["pid"]:
        raise UsageError("switch needs two targets: OUT and IN name the same one")
    if tight is not None:
        # no room beside OUT: plan as if OUT's memory were free (it will be); a plan that
        # fails even so is refused here, with nothing touched
        freed = gpu.used_memory(s_plan.cuda_pids)
        park.plan_resume(park.ResumeRequest(pid=req.into.pid, container=req.into.container,
                                            gpus=req.into.gpus, freed=freed))
        return SwitchPlan(req, s_plan, None, False,
                          "in turn: its GPUs have no room for it until the other is suspended",
                          time.perf_counter() - started)
    why = room_beside(r_plan) if not req.sequential else "in turn: --sequential"
    return SwitchPlan(req, s_plan, r_plan, why is None, why or "overlapped: it fits beside the other",
                      time.perf_counter() - started)


def room_beside(plan: park.ResumePlan) -> str | None:
    """Why IN's resume cannot run while OUT still holds its GPU memory, or None."""
    entry, move = plan.entry, plan.move
    if not entry.get("cuda") or move is None:
        return "in turn: no GPU facts to plan an overlap with (a container resumes on its own GPUs)"
    facts = CudaFacts.from_json(Fields(entry["cuda"], "parked.cuda"))
    weights = int((entry.get("sdk") or {}).get("bytes_out_of_image") or 0)
    return lacks_room(facts.used_memory, weights, plan.gpu_pairs, move.host)


def lacks_room(need: dict[str, int], weights: int, pairs: list[tuple[str, str]] | None,
               host: list[dict], margin: int = MARGIN) -> str | None:
    """need: bytes per GPU UUID IN held when parked; weights: its SDK weights (spread over
    the GPUs it holds memory on); pairs: where each GPU goes (None: the same UUIDs);
    host: this host's GPUs ({uuid, memory_free, ...}). Why it does not fit, or None."""
    holding = [u for u, n in need.items() if n]
    if not holding:
        return None
    where = dict(pairs or [])
    free = {g["uuid"]: int(g.get("memory_free") or 0) for g in host}
    for uuid in holding:
        onto = where.get(uuid, uuid)
        want = need[uuid] + weights // len(holding) + margin
        if free.get(onto, 0) < want:
            return (f"in turn: {onto[:12]} has {free.get(onto, 0) / 2**30:.1f} GiB free, "
                    f"{want / 2**30:.1f} GiB wanted beside the other")
    return None


class _Resuming:
    """IN's resume on a thread of its own: the driver's calls and the agents' socket
    waits let the GIL go, so it runs while OUT suspends."""

    def __init__(self, plan: park.ResumePlan):
        self.plan = plan
        self.value: dict | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, args=(plan,), name="gpusnap-switch-in",
                                       daemon=True)
        self.thread.start()

    def _run(self, plan) -> None:
        started = time.perf_counter()
        try:
            self.value = park.execute_resume(plan)
        except BaseException as exc:    # noqa: BLE001 - handed to the main thread
            self.error = exc
        self.seconds = time.perf_counter() - started

    def result(self) -> dict:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def execute_switch(plan: SwitchPlan) -> dict:
    """Returns {out, in, overlapped, reason, timings, notes}."""
    started = time.perf_counter()
    req = plan.request
    resuming = _Resuming(plan.resume) if plan.overlap else None
    out = into = None
    times: dict[str, float] = {"plan": plan.planned_s}
    try:
        t = time.perf_counter()
        out = park.execute_suspend(plan.suspend)
        times["suspend"] = time.perf_counter() - t
        if resuming is not None:
            into = resuming.result()
            times["resume"] = resuming.seconds
        else:
            t = time.perf_counter()
            into = park.execute_resume(plan.resume or park.plan_resume(req.into))
            times["resume"] = time.perf_counter() - t
    except BaseException as exc:
        with interrupts.shielded():
            undo_errors = _undo(req, plan.suspend.target.root_pid, out, resuming)
        if isinstance(exc, GpusnapError) and undo_errors:
            exc.hint = "; ".join(filter(None, [exc.hint, *undo_errors]))
        raise
    times["switch"] = time.perf_counter() - started + plan.planned_s
    return {"out": out, "in": into, "overlapped": plan.overlap, "reason": plan.reason,
            "timings": {k: round(v, 4) for k, v in times.items()},
            "notes": [*out.get("notes", []), *into.get("notes", [])]}


def _undo(req: SwitchRequest, out_pid: int, out: dict | None,
          resuming: _Resuming | None) -> list[str]:
    """Put both back as they were: IN parked, OUT running. Returns what could not be."""
    errors = []
    if resuming is not None:
        resuming.thread.join()
        if resuming.error is None and resuming.value is not None:
            target = req.into.container or str(req.into.pid)
            try:
                again = park.execute_suspend(park.plan_suspend(park.SuspendRequest(
                    pid=req.into.pid, container=req.into.container, engine=req.out.engine,
                    force=True)))
                _back_to_standby(resuming.plan.entry, again, errors)
            except GpusnapError as e:
                errors.append(f"{target} was resumed and could not be suspended again "
                              f"({e.message}): it runs; `gpusnap suspend {target}` parks it")
    if out is not None:
        try:
            park.execute_resume(park.plan_resume(park.ResumeRequest(
                pid=out_pid if not req.out.container else None, container=req.out.container)))
        except GpusnapError as e:
            errors.append(f"{req.out.container or out_pid} stays suspended ({e.message}): "
                          f"`gpusnap resume {req.out.container or out_pid}` brings it back")
    return errors


def _back_to_standby(was: dict, again: dict, errors: list[str]) -> None:
    """IN came from a standby pool (restore --standby): suspended again by the undo, it
    is listed as the standby it was, with its snapshot, not as a suspended process."""
    if was.get("state") != "standby":
        return
    entry = {k: v for k, v in again.items() if k not in ("host_memory", "timings", "notes", "started")}
    parked.record_quietly(dict(entry, state="standby", snapshot=was.get("snapshot"),
                               since=was.get("since", entry.get("since"))), errors)
