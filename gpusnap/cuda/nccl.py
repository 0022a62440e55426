"""NCCL jobs the driver's checkpoint cannot bring back: refuse them before the lock.

Measured on two H200s (driver 580): ranks of a NCCL job with its defaults lock and
checkpoint, but restore fails with 801 "operation not supported" (NCCL_CUMEM_ENABLE=0
alone: "invalid argument") and the ranks are lost: NCCL maps its peers' memory through
CUDA IPC, which the checkpoint does not carry. With NCCL_P2P_DISABLE=1 and
NCCL_CUMEM_ENABLE=0 (shared-memory transport, no cuMem handles) the round trip works.

A process counts as a NCCL rank with peers when it maps libnccl and it either maps one of
NCCL's shared-memory segments (/dev/shm/nccl-*) or its environment says it is one rank of
several (WORLD_SIZE or LOCAL_WORLD_SIZE > 1, as torchrun and most launchers set). Mapping
libnccl alone is not enough: every CUDA build of PyTorch loads it at import. It is safe
when its environment has both NCCL_P2P_DISABLE=1 and NCCL_CUMEM_ENABLE=0. Only the
environment a process started with is visible (/proc/PID/environ): a variable a server
set in itself after it started is not, hence --force. A rank whose SDK agent tears its
communicators down before the lock (gpusnap.sdk.collectives) is spared by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

from gpusnap.errors import NcclPeerMemory

REMEDY = "NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0"


@dataclass
class ProcFacts:
    """What /proc says of one process, as far as NCCL goes."""
    pid: int
    maps: list[str] = field(default_factory=list)      # the paths it maps
    env: dict[str, str] = field(default_factory=dict)  # its starting environment


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def is_rank_with_peers(facts: ProcFacts) -> bool:
    """Maps libnccl, and NCCL's shared memory or a world of more than one. Pure."""
    names = [path.rsplit("/", 1)[-1] for path in facts.maps]
    if not any(name.startswith("libnccl") for name in names):
        return False
    if any(path.startswith("/dev/shm/nccl-") for path in facts.maps):
        return True
    return any((_int(facts.env.get(key)) or 0) > 1
               for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))


def peer_memory_safe(env: dict[str, str]) -> bool:
    """NCCL told to keep off CUDA IPC: P2P disabled and cuMem off. Pure."""
    return _int(env.get("NCCL_P2P_DISABLE")) not in (None, 0) and \
        _int(env.get("NCCL_CUMEM_ENABLE")) == 0


def ipc_ranks(procs: list[ProcFacts]) -> list[int]:
    """The pids that are NCCL ranks free to use CUDA IPC peer memory. Pure."""
    return [p.pid for p in procs if is_rank_with_peers(p) and not peer_memory_safe(p.env)]


def read_facts(pid: int) -> ProcFacts:
    """ProcFacts from /proc; a process that is gone or unreadable gives empty facts."""
    facts = ProcFacts(pid)
    try:
        with open(f"/proc/{pid}/maps") as f:
            facts.maps = sorted({line.split(None, 5)[5].strip() for line in f
                                 if len(line.split(None, 5)) == 6})
        with open(f"/proc/{pid}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                key, sep, value = entry.partition(b"=")
                if sep:
                    facts.env[key.decode(errors="replace")] = value.decode(errors="replace")
    except OSError:
        pass
    return facts


def ipc_ranks_of(pids: list[int]) -> list[int]:
    """The pids (read from /proc) that are NCCL ranks free to use CUDA IPC."""
    return ipc_ranks([read_facts(pid) for pid in pids])


def refuse_ipc_ranks(pids: list[int], what: str, spared: Collection[int] = ()) -> None:
    """Raise NcclPeerMemory if any of pids is a NCCL rank that may use CUDA IPC, but for
    those in spared (their SDK agent tears the communicators down first)."""
    ranks = [pid for pid in ipc_ranks_of(pids) if pid not in spared]
    if ranks:
        raise NcclPeerMemory(
            f"pids {ranks} are NCCL ranks that may map their peers' GPU memory through CUDA "
            f"IPC: the driver checkpoints them but cannot restore them, and the job would be "
            f"lost; refused before anything was touched",
            hint=f"start every rank with {REMEDY} (shared-memory transport), or use the "
                 f"gpusnap SDK to tear the communicators down; --force {what}s anyway")
