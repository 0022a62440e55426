"""What a dump or a restore is asked to do (requests) and what it will do (plans).

A plan is what runs: plan() makes every check that can fail and records every choice
(the CRIU, its options, the GPU pairs, where a container goes, whether zero pages are
dropped); execute() reads the plan, not the environment. dump.py and restore.py are
the entry points; the strategy of the target's kind (engine/strategies) does the steps
that differ between a process tree and a container, behind Strategy and Dumper below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from ..criu.argv import CriuOptions
from ..imagefile.devnodes import NodeChange
from ..model import Manifest, Target

if TYPE_CHECKING:
    from ..store import Repository
    from ..targets.weights import Found


@dataclass
class DumpRequest:
    pid: int | None = None
    container: str | None = None
    engine: str | None = None
    name: str | None = None
    leave_running: bool = False
    lock_timeout_ms: int = 10_000
    pages: str = "auto"             # processes: auto, stream (CRIU's page stream into the store), staged
    force: bool = False             # dump anyway: a NCCL job that may use CUDA IPC (cuda/nccl.py),
                                    # a tree sharing descriptors with others (targets/fds.py)
    ignore_rootfs: bool = False     # containers: leave the filesystem changes out
    seed: tuple[str, ...] = ()      # weights files (or directories of them) seeded as it runs; "auto":
                                    # those the target names (targets/weights.py)


@dataclass
class DumpPlan:
    request: DumpRequest
    target: Target
    strategy: Strategy              # how this kind of target is dumped
    criu_path: str                  # the CRIU that dumps a process tree (podman finds it too)
    criu_version: str
    cuda_pids: list[int] = field(default_factory=list)
    criu_options: CriuOptions = field(default_factory=CriuOptions)
    zero_elide: bool = True         # drop all-zero pages (GPUSNAP_NO_ZERO_ELIDE=1: keep them)
    pages: str = "staged"           # stream: pages go from CRIU to the store (store/pagestream.py)
    collective_pids: list[int] = field(default_factory=list)    # NCCL ranks whose agent must prepare
    notes: list[str] = field(default_factory=list)  # for the manifest (what --force let through)
    seed_files: list[str] = field(default_factory=list)     # --seed's .safetensors files, checked
    seed_sources: list[str] = field(default_factory=list)   # their names in the seed's record
    seed_found: Found | None = None     # --seed auto: the files found, held open (close_seed())
    seed_skipped: list[str] = field(default_factory=list)   # --seed auto: found, not safetensors

    def close_seed(self) -> None:
        """The files --seed auto holds open are closed (once the dump is over)."""
        if self.seed_found is not None:
            self.seed_found.close()


@dataclass
class RestoreRequest:
    snapshot: str
    gpus: list[str] | None = None
    name: str | None = None             # containers: restore as a new container NAME
    devices: list[str] | None = None    # containers: OLD:NEW host device swaps
    pages: str = "auto"                 # processes: page path auto, uffd, criu (engine/pagepath.py)
    standby: bool = False               # processes: CUDA left checkpointed (engine/park.py resumes)


@dataclass
class ContainerPlacement:
    """Where a container snapshot is restored, and with which devices."""
    facts: dict                     # the manifest's target.container
    name: str                       # create a new container with this name
    into: str | None = None         # or restore into this existing (stopped) container
    devices: list[dict] | None = None       # new device list (None: as recorded)
    node_changes: list[NodeChange] = field(default_factory=list)


@dataclass
class RestorePlan:
    request: RestoreRequest
    manifest: Manifest
    strategy: Strategy              # how this kind of target is restored
    criu_path: str                  # the CRIU that restores a process tree (podman finds it too)
    criu_options: CriuOptions = field(default_factory=CriuOptions)
    gpu_pairs: list[tuple[str, str]] | None = None
    notes: list[str] = field(default_factory=list)
    container: ContainerPlacement | None = None
    page_path: str = "criu"         # processes: how memory gets in (engine/pagepath.py)


class Dumper(Protocol):
    """Takes the images of one dump; dump.py orders the steps around it."""
    stage: str                      # the name of the stage that takes the images
    undo_errors: list[str]          # what resume() could not undo

    def dump(self, images: str, logs: str, leave_running: bool, pages=None) -> None:
        """Write the images under `images`; on failure, leave the original as it was.
        pages (process trees): serves CRIU's page stream instead of pages images."""

    def pids_now(self) -> list[int]:
        """The target's pids as they are now, [] once it is gone (a new CUDA process
        among them races the dump: engine/cudarace.py)."""

    def criu_dir(self, images: str) -> str:
        """Where the CRIU image files are inside `images`."""

    def finish(self) -> None:
        """The snapshot is committed: the original goes."""

    def resume(self) -> None:
        """Undo a dump that stopped the original; a no-op where the original runs (an
        undo calls it whenever the dump may have stopped it). Never raises."""


class Strategy(Protocol):
    """How one kind of target ('process', 'docker', 'podman') is dumped and restored."""
    kind: str
    sdk_agents: bool                # SDK agents of the target are asked to drop weights

    def preflight(self, req: DumpRequest, target: Target) -> list[str]:
        """The refusals of this kind of target, before it is touched; notes for the manifest."""

    def criu_options(self, target: Target) -> CriuOptions:
        """gpusnap's CRIU options for a dump of target; a refusal raised here comes
        before it is touched."""

    def dumper(self, plan: DumpPlan, cuda) -> Dumper:
        """The Dumper of one dump (cuda: its CudaSession, or None)."""

    def plan_restore(self, req: RestoreRequest, manifest: Manifest, criu_path: str) -> RestorePlan:
        """Every check that can fail before anything is restored; a plan or a refusal."""

    def restore(self, plan: RestorePlan, repo: Repository,
                progress: Callable[[int], None] | None = None) -> dict:
        """Run the plan, undoing what it did on any failure; restore.execute's dict."""
