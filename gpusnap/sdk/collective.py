"""Servers of several ranks that run collectives (NCCL) in lockstep: every rank stops at
the same step, its communicators are torn down before the checkpoint and built again
after the restore, as vLLM's sleep mode and torch.distributed's destroy_process_group +
init_process_group allow. The driver's checkpoint cannot bring back a communicator that
maps its peers' memory through CUDA IPC (NCCL's defaults); one that does not exist
while the checkpoint is taken needs no such care, and gpusnap does not refuse the ranks.

    agent = gpusnap.sdk.enable(model, files)
    group = gpusnap.sdk.TorchGroup(store_dir, rank, world_size, device=f"cuda:{rank}")
    group.init()
    gpusnap.sdk.collectives(agent, group.destroy, group.init)
    while True:                                   # every rank
        with agent.serving():
            step = exchange(agent.checkpoint_wanted())   # one collective: any rank's wish
            if not step.stop:                             # counts for all of them
                work(step)
        if step.stop:
            agent.wait_prepared(60)               # then serving() waits for resume

A prepare sets checkpoint_wanted() before it waits for the serving gate; the ranks learn
of it at their next shared step and all leave the gate, so every rank's prepare gets it
between the same two steps and no rank waits inside a collective for a peer that
stopped. gpusnap sends prepare (and later resume) to every rank's agent at once: the
teardown and the rebuild, collectives themselves, meet.

Depends on the standard library; torch only inside TorchGroup's methods.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading


REBUILD_TIMEOUT_S = 300.0


def collectives(agent, teardown, rebuild, rebuild_timeout_s: float | None = REBUILD_TIMEOUT_S):
    """Register teardown (run by prepare, before the weights are dropped) and rebuild
    (run by resume, once the weights are back) on agent; status() and prepare's reply
    then say "collectives": true, which gpusnap takes as the promise that no
    communicator exists while CUDA is checkpointed. rebuild runs only after a teardown
    that completed (a prepare that failed before it leaves the communicators as they
    were). A rebuild is a rendezvous: one that has not returned after rebuild_timeout_s
    (a peer missing, a store gone wrong, a backend that does not honour its own
    timeout) makes resume fail with TimeoutError, and every later resume fails at once
    while it is still stuck, instead of waiting for it. Returns the agent."""
    state = {"down": False, "stuck": None}
    lock = threading.Lock()

    def down():
        with lock:
            if not state["down"]:
                teardown()
                state["down"] = True

    def up():
        with lock:
            stuck = state["stuck"]
            if stuck is not None and stuck.is_alive():
                raise TimeoutError("an earlier rebuild of the communicators has not returned: "
                                   "this rank's process groups cannot be used; restart the server")
            if state["down"]:
                _bounded(rebuild, rebuild_timeout_s, state)
                state["down"] = False

    agent.on_prepare.insert(0, down)
    agent.on_resume.append(up)
    agent.collectives = True
    return agent


def _bounded(fn, timeout_s: float | None, state: dict) -> None:
    """Run fn on a thread of its own (state["stuck"]) and wait for it at most timeout_s
    (None: inline, for ever); its exception is raised here. Raises TimeoutError when it
    has not returned, after printing every thread's stack on stderr (the thread, a
    daemon, is left to itself: a rendezvous in C++ cannot be interrupted)."""
    if timeout_s is None:
        fn()
        return
    outcome: list = []

    def run():
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome.append(e)
    worker = state["stuck"] = threading.Thread(target=run, name="gpusnap-rebuild", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        print(f"gpusnap agent: the communicators' rebuild has not returned in {timeout_s:g} s; "
              f"where every thread is:", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
        raise TimeoutError(f"the communicators were not rebuilt within {timeout_s:g} s (a rank "
                           f"missing from the rendezvous, or one that met a stale one): this "
                           f"rank's process groups cannot be used; restart the server")
    if outcome and outcome[0] is not None:
        raise outcome[0]


def timens_offset_ns() -> int:
    """CLOCK_BOOTTIME's offset in this process's time namespace (/proc/self/timens_offsets,
    Linux >= 5.6), in ns; 0 outside one or where the kernel has none."""
    try:
        with open("/proc/self/timens_offsets") as f:
            for line in f:
                name, secs, nsecs = line.split()
                if name == "boottime":
                    return int(secs) * 1_000_000_000 + int(nsecs)
    except (OSError, ValueError):
        pass
    return 0


def parent_epoch() -> str:
    """The same for every rank one launcher started (torchrun, a server's own launcher),
    and new for each start of the tree: the parent's start time (clock ticks since boot,
    /proc/PPID/stat), and, in a time namespace, its boot clock's offset. CRIU restores
    a tree into a time namespace whose clocks go on from the dump, so every restore of
    one snapshot sees its launcher start at about the same tick (at the same tick, now
    and then); the offset, which CRIU sets to the nanosecond for each restore, tells
    them apart."""
    try:
        with open(f"/proc/{os.getppid()}/stat") as f:
            ticks = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        ticks = "0"
    offset = timens_offset_ns()
    return f"{ticks}@{offset}" if offset else ticks


class TorchGroup:
    """torch.distributed's default process group over a FileStore (no TCP store for
    CRIU to carry), built again with a fresh store file each time: generation g of
    rank r meets generation g of its peers in store_dir/store-<epoch>-<g>. The epoch
    (default: parent_epoch()) keeps a second restore of one snapshot from meeting in the
    file the first one left (whose keys would send it to peers that are gone). cpu_group: also a
    gloo group over the same ranks (self.cpu_group; the default group itself when the
    backend is gloo), for control messages a rank can wait on without GPU work in flight."""

    def __init__(self, store_dir: str, rank: int, world_size: int, backend: str = "nccl",
                 device: str | None = None, timeout_s: float = 120.0, cpu_group: bool = False,
                 epoch=parent_epoch):
        self.store_dir, self.rank, self.world_size = store_dir, rank, world_size
        self.backend, self.device, self.timeout_s = backend, device, timeout_s
        self.want_cpu_group, self.epoch = cpu_group, epoch
        self.cpu_group = None
        self.generation = 0

    def init(self) -> None:
        import datetime

        import torch
        import torch.distributed as dist
        path = os.path.join(self.store_dir, f"store-{self.epoch()}-{self.generation}")
        store = dist.FileStore(path, self.world_size)
        kw = {}
        if self.device and self.device.startswith("cuda"):
            kw["device_id"] = torch.device(self.device)     # NCCL communicator built now
        dist.init_process_group(self.backend, store=store, rank=self.rank,
                                world_size=self.world_size,
                                timeout=datetime.timedelta(seconds=self.timeout_s), **kw)
        if self.want_cpu_group:
            self.cpu_group = dist.group.WORLD if self.backend == "gloo" else \
                dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
        dist.barrier()
        self.generation += 1

    def destroy(self) -> None:
        import torch.distributed as dist
        self.cpu_group = None
        if dist.is_initialized():
            dist.destroy_process_group()
