"""What a dump or a restore is asked to do (requests) and what it will do (plans).

A plan is what runs: plan() makes every check that can fail and records every choice
(the CRIU, its options, the GPU pairs, where a container goes, whether zero pages are
dropped); execute() reads the plan, not the environment. dump.py and restore.py are
the entry points; the strategy of the target's kind (engine/strategies) does the steps
that differ between a process tree and a container.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..criu.argv import CriuOptions
from ..imagefile.devnodes import NodeChange
from ..model import Target

if TYPE_CHECKING:
    from .strategies import Strategy


@dataclass
class DumpRequest:
    pid: int | None = None
    container: str | None = None
    engine: str | None = None
    name: str | None = None
    leave_running: bool = False
    lock_timeout_ms: int = 10_000


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


@dataclass
class RestoreRequest:
    snapshot: str
    gpus: list[str] | None = None
    name: str | None = None             # containers: restore as a new container NAME
    devices: list[str] | None = None    # containers: OLD:NEW host device swaps


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
    manifest: dict
    strategy: Strategy              # how this kind of target is restored
    criu_path: str                  # the CRIU that restores a process tree (podman finds it too)
    criu_options: CriuOptions = field(default_factory=CriuOptions)
    gpu_pairs: list[tuple[str, str]] | None = None
    notes: list[str] = field(default_factory=list)
    container: ContainerPlacement | None = None
