"""A Docker or Podman container: its engine checkpoints and restores it, so that the
engine's own state stays consistent (docker/podman know it exited from a checkpoint).
One strategy for both, parameterised by the engine (targets/container_engine.py).

Dump: a checkpoint that stops the container really stops it, so the undo (resume)
starts it again from the images just taken, then restores and unlocks the CUDA
processes inside it, which come back CHECKPOINTED under new host pids. Once the
snapshot is committed the container stays stopped (`gpusnap restore` can restore into it).

Restore, where it goes:
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

--ignore-rootfs leaves the container's filesystem changes out of the snapshot (podman's
flag of that name; for docker, gpusnap archives no upper dir): a restore into a new
container starts from its image's filesystem.

Restore steps, with their undo:
    materialise (verified)          <- (the work dir goes)
    engine restore (new container)  <- container removed (or, restored into: killed)
    CUDA restore + unlock           <- container killed
    still running after the settle window (engine/alive.py), else as above
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from typing import Callable

from ... import interrupts
from ...criu.argv import CriuOptions
from ...errors import ContainerEngineError, GpusnapError, PidInUse, UsageError
from ...model import Manifest, Target
from ...store import Repository
from ...targets import containers, devices
from .. import alive, gpu, workdir
from ..plans import ContainerPlacement, DumpPlan, DumpRequest, RestorePlan, RestoreRequest
from ..timing import Stages


class ContainerStrategy:
    sdk_agents = False              # an agent's socket is in the container's mount namespace

    def __init__(self, kind: str):
        self.kind = kind
        self.engine = containers.get_engine(kind)

    def preflight(self, req: DumpRequest, target: Target) -> list[str]:
        """The engine hands a container's stdio to its own monitor (conmon, the docker
        shim) and checkpoints it: nothing to refuse here."""
        if req.ignore_rootfs:
            return ["--ignore-rootfs: the container's filesystem changes are not in the "
                    "snapshot; a restore as a new container starts from its image's"]
        return []

    def criu_options(self, target: Target) -> CriuOptions:
        """Only shell_job: the engine runs CRIU with its own configuration."""
        return CriuOptions(shell_job=target.shell_job)

    def dumper(self, plan: DumpPlan, cuda=None) -> ContainerDump:
        return ContainerDump(self.engine, plan, cuda)

    # ---- restore: plan ----------------------------------------------------------------
    def plan_restore(self, req: RestoreRequest, manifest: Manifest, criu_path: str) -> RestorePlan:
        engine = self.engine
        why = engine.unavailable()
        if why:
            raise ContainerEngineError(f"{engine.kind} is not usable: {why}")
        engine.check_checkpoint_support()
        if req.standby:
            raise UsageError("--standby is for process snapshots (a container's CUDA "
                             "processes are restored by its engine's restore)")
        facts = manifest.target.container
        device_map = devices.parse_device_maps(req.devices)
        plan = RestorePlan(request=req, manifest=manifest, strategy=self, criu_path=criu_path)
        if manifest.cuda:
            move = gpu.plan_remap(manifest.cuda, req.gpus, _visible_minors(facts))
            plan.gpu_pairs, plan.notes = move.pairs, move.notes
            for old, new in devices.gpu_device_map(move.snapshot, move.host, move.pairs).items():
                if device_map.setdefault(old, new) != new:
                    raise UsageError(f"--device {old}:{device_map[old]} contradicts --gpu "
                                     f"(which puts {old} on {new})")
        plan.container = ContainerPlacement(facts=facts, name=req.name or facts["name"],
                                            into=self._into(req, facts, bool(device_map)))
        if device_map:
            plan.container.devices, plan.container.node_changes = _moved_devices(
                facts, device_map, plan.notes)
        return plan

    def _into(self, req: RestoreRequest, facts: dict, new_devices: bool) -> str | None:
        """The recorded container to restore into, or None for a new one; refuses a
        name taken by another container and a recorded container that runs."""
        engine = self.engine
        if req.name:
            if engine.inspect(req.name) is not None:
                raise UsageError(f"a {engine.kind} container named '{req.name}' exists",
                                 hint="pick another --name, or remove that container")
            return None
        existing = engine.inspect(facts["id"])
        if existing is None and engine.inspect(facts["name"]) is not None:
            raise UsageError(f"the name '{facts['name']}' now belongs to another container",
                             hint="restore a copy with --name NEW")
        if existing is None:
            return None
        running, _ = engine.state(facts["id"])
        if running:
            raise PidInUse(f"{engine.kind} container '{facts['name']}' is running: "
                           f"the original is still there",
                           hint="stop it first, or restore a copy with --name NEW")
        if new_devices:
            raise UsageError("--gpu/--device change the container's devices: that "
                             "makes a new container", hint="give it a --name NEW")
        return facts["id"]

    # ---- restore: run -----------------------------------------------------------------
    def restore(self, plan: RestorePlan, repo: Repository,
                progress: Callable[[int], None] | None = None) -> dict:
        """engine restore (materialise inside) -> CUDA restore + unlock."""
        m, where, stages = plan.manifest, plan.container, Stages()
        work = workdir.make(repo.path, "restore-")
        marker = f"{m.id} {secrets.token_hex(6)}"
        restored = None

        def materialise(dest: str, prefix: str) -> None:
            with stages.stage("materialise"):
                repo.materialise(_subset(m, prefix), dest, progress)

        try:
            with repo.shared_lock(), repo.prefetch(m):
                with stages.stage("engine_restore"), interrupts.held():
                    restored = self.engine.restore(
                        where.facts, materialise, into=where.into, name=where.name,
                        devices=where.devices, node_changes=where.node_changes, work=work,
                        marker=marker)
            # engine_restore includes materialise; report it on its own
            stages.seconds["engine_restore"] -= stages.seconds.get("materialise", 0.0)
            if m.cuda:
                with stages.stage("cuda_restore"):
                    restore_cuda(restored["pid"], plan.gpu_pairs)
            alive.settle_and_check_container(self.engine, restored, stages)
            return {"pid": restored["pid"], "snapshot": m.id, "timings": stages.to_dict(),
                    "notes": plan.notes,
                    "container": {"engine": self.engine.kind, "id": restored["id"],
                                  "name": restored["name"]}}
        except BaseException:
            if restored is not None:
                with interrupts.shielded():     # a second Ctrl-C must not cut the undo short
                    self._undo_restore(restored)
            raise
        finally:
            with interrupts.shielded():         # a second Ctrl-C must not cut the clean-up short
                workdir.remove(work)

    def _undo_restore(self, restored: dict) -> None:
        if restored.get("created"):
            self.engine.remove(restored["id"])
        else:
            self.engine.kill(restored["id"])


def _visible_minors(facts: dict) -> set[int]:
    """The GPUs a container's processes see: those whose /dev/nvidiaN nodes it has."""
    return {d["minor"] for d in facts.get("gpu_devices") or []
            if d["path"][len(devices.NVIDIA_PREFIX):].isdigit()}


def _moved_devices(facts: dict, device_map: dict[str, str], notes: list[str]):
    """(new device list, node changes) for {old host path: new host path}; refuses a
    device the container was not given."""
    recorded = facts.get("devices") or []
    new, changes, missing = devices.remap_devices(recorded, device_map)
    if missing:
        raise UsageError(f"the container was not given {', '.join(missing)} as a "
                         f"device (--device); gpusnap can only move devices it was "
                         f"given", hint=f"its devices: "
                         f"{', '.join(d['host'] for d in recorded) or 'none'}")
    notes += [f"host device {new} in place of {old}" for old, new in device_map.items()]
    return new, changes


def _subset(m: Manifest, prefix: str) -> Manifest:
    """The manifest's files under prefix ('checkpoint/': that dir, paths made relative
    to it; 'rootfs-diff.tar': that file; '': all)."""
    if not prefix:
        return m
    if prefix.endswith("/"):
        files = [dataclasses.replace(e, path=e.path[len(prefix):]) for e in m.files
                 if e.path.startswith(prefix)]
    else:
        files = [e for e in m.files if e.path == prefix]
    return dataclasses.replace(m, files=files)


def restore_cuda(init_pid: int, pairs, required: bool = True) -> list[int]:
    """Restore and unlock the CUDA processes of a container just restored (their host
    pids are new: found as the container's pids the driver reports CHECKPOINTED or
    LOCKED). Returns those pids. required: none found is an error (else: a CRIU action
    script already did it)."""
    from ...cuda import CudaState, discover, get_driver
    from ...errors import CudaFailed
    driver = get_driver()
    pids = [p for p in discover.cuda_pids(containers.container_pids(init_pid), driver)
            if driver.get_state(p) in (CudaState.CHECKPOINTED, CudaState.LOCKED)]
    if not pids and not required:
        return []
    if not pids:
        raise CudaFailed("the restored container has no checkpointed CUDA process",
                         hint="was the CUDA state already restored (a CRIU action script)?")
    session = gpu.session(pids)
    session.restore_all(pairs)
    session.unlock_all()
    return pids


class ContainerDump:
    """The engine checkpoints the container; an undo starts it again from the images."""
    stage = "engine_checkpoint"

    def __init__(self, engine, plan: DumpPlan, cuda=None):
        self.engine = engine
        self.facts = plan.target.container
        self.init_pid = plan.target.root_pid
        self.ignore_rootfs = plan.request.ignore_rootfs
        self.cuda = cuda
        self.images: str | None = None
        self.undo_errors: list[str] = []
        self.stopped_for_criu: list[int] = []   # never: the engine's CRIU locks the netns

    def dump(self, images: str, logs: str, leave_running: bool, pages=None) -> None:
        self.images = images
        work = os.path.dirname(images)
        try:
            with interrupts.held():
                self.engine.checkpoint(self.facts, images, work, leave_running,
                                       ignore_rootfs=self.ignore_rootfs)
        except BaseException:
            # The engine resumes the container when the checkpoint fails; if it stopped
            # it anyway and the images are whole, start it again from them.
            if not leave_running:
                self.resume()
            raise

    def _stopped(self) -> bool:
        try:
            return not self.engine.state(self.facts["id"])[0]
        except GpusnapError:
            return False

    def _images_whole(self) -> bool:
        return bool(self.images) and os.path.exists(
            os.path.join(self.images, "checkpoint", "inventory.img"))

    def pids_now(self) -> list[int]:
        """The container's host pids as they are now ([] once it is gone)."""
        try:
            return containers.container_pids(self.init_pid)
        except GpusnapError:
            return []

    def criu_dir(self, images: str) -> str:
        return os.path.join(images, "checkpoint")

    def finish(self) -> None:
        """The engine stopped the container at the checkpoint; it stays as it is (a
        stopped container that `gpusnap restore` can restore into)."""

    def resume(self) -> None:
        """Started again from the images when the checkpoint stopped it and they are
        whole; else left as it is. Never raises: what failed is kept in undo_errors."""
        if not (self._stopped() and self._images_whole()):
            return
        try:
            with interrupts.shielded():     # an undo runs to its end
                pid = self.engine.resume_from(self.facts, self.images)
        except BaseException as e:  # noqa: BLE001 - an undo reports, it does not raise
            self.undo_errors.append(f"the container could not be started again from its "
                                    f"checkpoint: {getattr(e, 'message', e)}")
            return
        if self.cuda:
            self.cuda.release()     # the old pids are gone; the new ones are handled here
            try:
                restore_cuda(pid, None, required=False)
            except BaseException as e:  # noqa: BLE001
                self.undo_errors.append(f"CUDA restore in the restarted container failed: "
                                        f"{getattr(e, 'message', e)}")
