"""Restore a container snapshot through its engine, then CUDA restore + unlock.

Where it goes:
- --name NEW: a new container NEW (made from the recorded image and config);
- else the recorded container, if it still exists and is stopped (restore into it);
  if it is running: refused (exit 6), as for a process whose pids are taken;
- else a new container with the recorded name.

--gpu moves the CUDA state by UUID pairs (gpusnap.remap) and, for the container, swaps
the host device behind each GPU node it had: host /dev/nvidia1 in place of
/dev/nvidia0, under the container path /dev/nvidia0 the processes know. That needs a
new container (its device list changes): in the engine's create config, in the device
cgroup rules, and in the node CRIU restores into the container's /dev from its tmpfs
image (gpusnap.imagefile.devnodes). --device OLD:NEW does the same for any device.

Steps, with their undo:
    materialise (verified)          <- (the work dir goes)
    engine restore (new container)  <- container removed (or, restored into: killed)
    CUDA restore + unlock           <- container killed
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable

from ..errors import PidInUse, UsageError
from ..store import Repository
from ..targets import containers
from . import checkpointer, workdir
from .timing import Stages


@dataclass
class ContainerRestorePlan:
    request: object                 # restore.RestoreRequest
    manifest: dict
    engine: object
    facts: dict
    into: str | None                # restore into this existing (stopped) container
    name: str                       # or create a new one with this name
    devices: list[dict] | None = None       # new device list (None: as recorded)
    node_changes: list = field(default_factory=list)
    gpu_pairs: list[tuple[str, str]] | None = None
    notes: list[str] = field(default_factory=list)


def plan(req, repo: Repository, manifest: dict) -> ContainerRestorePlan:
    facts = manifest["target"]["container"]
    engine = containers.get_engine(manifest["target"]["kind"])
    why = engine.unavailable()
    if why:
        from ..errors import ContainerEngineError
        raise ContainerEngineError(f"{engine.kind} is not usable: {why}")
    engine.check_checkpoint_support()

    device_map = containers.parse_device_maps(getattr(req, "devices", None))
    p = ContainerRestorePlan(request=req, manifest=manifest, engine=engine, facts=facts,
                             into=None, name=getattr(req, "name", None) or facts["name"])
    if manifest.get("cuda"):
        p.gpu_pairs, gpu_map, p.notes = _plan_gpus(manifest["cuda"], facts, req.gpus)
        for old, new in gpu_map.items():
            if device_map.setdefault(old, new) != new:
                raise UsageError(f"--device {old}:{device_map[old]} contradicts --gpu "
                                 f"(which puts {old} on {new})")

    if getattr(req, "name", None):
        if engine.inspect(req.name) is not None:
            raise UsageError(f"a {engine.kind} container named '{req.name}' exists",
                             hint="pick another --name, or remove that container")
    else:
        existing = engine.inspect(facts["id"])
        if existing is None and engine.inspect(facts["name"]) is not None:
            raise UsageError(f"the name '{facts['name']}' now belongs to another container",
                             hint="restore a copy with --name NEW")
        if existing is not None:
            running, _ = engine.state(facts["id"])
            if running:
                raise PidInUse(f"{engine.kind} container '{facts['name']}' is running: "
                               f"the original is still there",
                               hint="stop it first, or restore a copy with --name NEW")
            if device_map:
                raise UsageError("--gpu/--device change the container's devices: that "
                                 "makes a new container", hint="give it a --name NEW")
            p.into = facts["id"]

    if device_map:
        p.devices, p.node_changes, missing = containers.remap_devices(
            facts.get("devices") or [], device_map)
        if missing:
            raise UsageError(f"the container was not given {', '.join(missing)} as a "
                             f"device (--device); gpusnap can only move devices it was "
                             f"given", hint=f"its devices: "
                             f"{', '.join(d['host'] for d in facts.get('devices') or []) or 'none'}")
        for old, new in device_map.items():
            p.notes.append(f"host device {new} in place of {old}")
    return p


def _plan_gpus(cuda: dict, facts: dict, choice):
    """(UUID pairs or None, {old host node: new host node}, notes) for the CUDA state."""
    from ..cuda.discover import host_gpus
    from ..remap import plan_remap
    snapshot = cuda.get("gpus") or []
    # Inside a container the processes see only the GPUs whose nodes it has.
    minors = {d["minor"] for d in facts.get("gpu_devices") or []
              if d["path"][len("/dev/nvidia"):].isdigit()}
    if minors:
        snapshot = [g for g in snapshot if g.get("minor") is None or g["minor"] in minors] \
            or snapshot
    host = [g.to_dict() for g in host_gpus().gpus]
    remap = plan_remap(snapshot, host, choice, cuda.get("used_memory"))
    pairs = remap.pairs
    return pairs, containers.gpu_device_map(snapshot, host, pairs), list(remap.notes)


def execute(p: ContainerRestorePlan, repo: Repository,
            progress: Callable[[int], None] | None = None) -> dict:
    """Returns {'pid', 'container': {engine, id, name}, 'snapshot', 'timings', 'notes'}."""
    m = p.manifest
    stages = Stages()
    work = workdir.make(repo.path, "restore-")
    marker = f"{m['id']} {secrets.token_hex(6)}"
    restored = None

    def materialise(dest: str, prefix: str) -> None:
        with stages.stage("materialise"):
            repo.materialise(_subset(m, prefix), dest, progress)

    try:
        with repo.shared_lock():
            with stages.stage("engine_restore"), checkpointer.hold_interrupts():
                restored = p.engine.restore(
                    p.facts, materialise, into=p.into, name=p.name, devices=p.devices,
                    node_changes=p.node_changes, work=work, marker=marker)
        # engine_restore includes materialise; report it on its own
        stages.seconds["engine_restore"] -= stages.seconds.get("materialise", 0.0)
        if m.get("cuda"):
            with stages.stage("cuda_restore"):
                checkpointer.restore_container_cuda(restored["pid"], p.gpu_pairs)
        return {"pid": restored["pid"], "snapshot": m["id"], "timings": stages.to_dict(),
                "notes": p.notes,
                "container": {"engine": p.engine.kind, "id": restored["id"],
                              "name": restored["name"]}}
    except BaseException:
        if restored is not None:
            with checkpointer.unwinding():      # a second Ctrl-C must not cut the undo short
                if restored.get("created"):
                    p.engine.remove(restored["id"])
                else:
                    p.engine.kill(restored["id"])
        raise
    finally:
        workdir.remove(work)


def _subset(m: dict, prefix: str) -> dict:
    """The manifest's files under prefix ('checkpoint/': that dir, paths made relative
    to it; 'rootfs-diff.tar': that file; '': all)."""
    if not prefix:
        return m
    if prefix.endswith("/"):
        files = [dict(e, path=e["path"][len(prefix):]) for e in m.get("files", [])
                 if e["path"].startswith(prefix)]
    else:
        files = [e for e in m.get("files", []) if e["path"] == prefix]
    return dict(m, files=files)
