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

import os
import threading


def collectives(agent, teardown, rebuild):
    """Register teardown (run by prepare, before the weights are dropped) and rebuild
    (run by resume, once the weights are back) on agent; status() and prepare's reply
    then say "collectives": true, which gpusnap takes as the promise that no
    communicator exists while CUDA is checkpointed. rebuild runs only after a teardown
    that completed (a prepare that failed before it leaves the communicators as they
    were). Returns the agent."""
    state = {"down": False}
    lock = threading.Lock()

    def down():
        with lock:
            if not state["down"]:
                teardown()
                state["down"] = True

    def up():
        with lock:
            if state["down"]:
                rebuild()
                state["down"] = False

    agent.on_prepare.insert(0, down)
    agent.on_resume.append(up)
    agent.collectives = True
    return agent


def parent_epoch() -> str:
    """The parent's start time (clock ticks since boot, /proc/PPID/stat): the same for
    every rank one launcher started (torchrun, a server's own launcher), and new after
    each restore of the tree, which starts every process again."""
    try:
        with open(f"/proc/{os.getppid()}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


class TorchGroup:
    """torch.distributed's default process group over a FileStore (no TCP store for
    CRIU to carry), built again with a fresh store file each time: generation g of
    rank r meets generation g of its peers in store_dir/store-<epoch>-<g>. The epoch
    (default: parent_epoch()) keeps a second restore of one snapshot from meeting in the
    file the first one left. cpu_group: also a
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
