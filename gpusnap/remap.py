"""Which host GPU each snapshot GPU restores onto. Pure: no driver, no NVML.

The driver (cuCheckpointProcessRestore, r580) restores onto a GPU of the same chip with
enough free memory, and takes the map whole: once any pair is given, every GPU the
process had must appear exactly once as old, each onto a different new GPU. A lone pair
0->1 on a two-GPU host is rejected (invalid argument); the swap 0->1, 1->0 works. So the
plan always maps every snapshot GPU, and is refused here, before anything is touched,
when it cannot be whole.

--gpu reads like CUDA_VISIBLE_DEVICES: indexes or UUIDs (or unique UUID prefixes). Naming
every snapshot GPU, the i-th says where snapshot GPU i goes. Naming fewer, they go to the
snapshot GPUs that hold device memory, in order (a process that sees two GPUs but uses
one: `--gpu 0` moves the one it uses onto GPU 0); the rest go where the default puts
them, and one that holds memory but is left unnamed is refused.

Default: each snapshot GPU onto the host GPU with its UUID; where that is absent or
taken, onto the first free host GPU of the same chip with room.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpusnap.errors import GpuMismatch, UsageError

GIB = 1 << 30


@dataclass
class RemapPlan:
    mapping: list[tuple[str, str]] = field(default_factory=list)   # (snapshot, host) UUIDs
    notes: list[str] = field(default_factory=list)

    @property
    def identity(self) -> bool:
        return all(old == new for old, new in self.mapping)

    @property
    def pairs(self) -> list[tuple[str, str]] | None:
        """What to pass to the restore: None when every GPU stays where it was."""
        return None if self.identity else list(self.mapping)

    def to_dict(self) -> dict:
        return {"mapping": [list(p) for p in self.mapping], "pairs":
                None if self.identity else [list(p) for p in self.mapping],
                "notes": list(self.notes)}


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _short(uuid: str) -> str:
    return uuid[:12]


def _index(gpu: dict, position: int) -> int:
    return int(gpu.get("index", position))


def _label(gpu: dict, position: int) -> str:
    return f"GPU {_index(gpu, position)} ({_short(gpu['uuid'])}, {gpu['name']})"


def _tokens(choice: list[str] | None) -> list[str]:
    return [t.strip() for item in choice or [] for t in str(item).split(",") if t.strip()]


def _resolve(token: str, host: list[dict]) -> int:
    """A --gpu token -> position in host."""
    if token.isdigit():
        for pos, gpu in enumerate(host):
            if _index(gpu, pos) == int(token):
                return pos
        raise GpuMismatch(f"--gpu {token}: this host has no GPU {token}",
                          hint=f"its GPUs: {', '.join(_label(g, p) for p, g in enumerate(host))}")
    low = token.lower()
    hits = [pos for pos, gpu in enumerate(host)
            if gpu["uuid"].lower().startswith(low) or
            gpu["uuid"].lower().removeprefix("gpu-").startswith(low)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise GpuMismatch(f"--gpu {token}: no GPU of this host has that UUID")
    raise UsageError(f"--gpu {token}: the prefix matches {len(hits)} GPUs; give more of it")


def plan_remap(snapshot_gpus: list[dict], host_gpus: list[dict],
               choice: list[str] | None = None,
               need: dict[str, int] | None = None) -> RemapPlan:
    """snapshot_gpus: every GPU the process had, in its device order ({uuid, name,
    memory_total}); host_gpus: this host's ({uuid, name, memory_total, memory_free,
    optional index}); choice: --gpu tokens or None; need: device memory the snapshot
    holds per snapshot GPU UUID (absent: none; need=None: unknown, not checked)."""
    if not snapshot_gpus:
        return RemapPlan()
    tokens = _tokens(choice)
    if len(tokens) > len(snapshot_gpus):
        raise GpuMismatch(f"--gpu names {len(tokens)} GPUs; the snapshot had "
                          f"{len(snapshot_gpus)}")
    if len(host_gpus) < len(snapshot_gpus):
        raise GpuMismatch(f"the snapshot had {len(snapshot_gpus)} GPUs; this host has "
                          f"{len(host_gpus)}", hint="restore on a host with as many GPUs")
    planner = _Planner(snapshot_gpus, host_gpus, need)
    planner.named(tokens)
    planner.same_uuid()
    planner.same_chip()
    return planner.plan()


class _Planner:
    """The rules in the order the module header gives them; target maps a snapshot
    GPU's position to a host GPU's position."""

    def __init__(self, snapshot: list[dict], host: list[dict], need: dict[str, int] | None):
        self.snapshot, self.host, self.need = snapshot, host, need
        self.target: dict[int, int] = {}
        self.notes: list[str] = []
        self.by_uuid = {g["uuid"]: pos for pos, g in enumerate(host)}

    def needs(self, snap: dict) -> int:
        return (self.need or {}).get(snap["uuid"], 0)

    def fits(self, snap: dict, pos: int) -> str | None:
        """Why host GPU pos cannot take snap, or None."""
        gpu = self.host[pos]
        if gpu["name"] != snap["name"]:
            return f"{_label(gpu, pos)} is not a {snap['name']}"
        want = self.needs(snap)
        if self.need is not None and want > gpu.get("memory_free", 0):
            return (f"{_label(gpu, pos)} has {_gib(gpu.get('memory_free', 0))} free; "
                    f"the snapshot needs {_gib(want)} there")
        return None

    def rest(self) -> list[int]:
        return [i for i in range(len(self.snapshot)) if i not in self.target]

    def named(self, tokens: list[str]) -> None:
        """--gpu: all snapshot GPUs in order, or fewer: those holding memory first."""
        order = list(range(len(self.snapshot)))
        if tokens and len(tokens) < len(self.snapshot) and self.need is not None:
            order.sort(key=lambda i: 0 if self.needs(self.snapshot[i]) else 1)
        for i, token in zip(order, tokens):
            pos = _resolve(token, self.host)
            if pos in self.target.values():
                raise UsageError(f"--gpu names {_label(self.host[pos], pos)} twice")
            why = self.fits(self.snapshot[i], pos)
            if why:
                raise GpuMismatch(f"snapshot GPU {i} cannot go to {why}")
            self.target[i] = pos
            self.notes.append(f"snapshot GPU {i} ({_short(self.snapshot[i]['uuid'])}) onto "
                              f"{_label(self.host[pos], pos)} (--gpu)")
        if tokens:
            self._refuse_unnamed_memory(len(tokens))

    def _refuse_unnamed_memory(self, named: int) -> None:
        holding = [i for i in self.rest() if self.need is None or self.needs(self.snapshot[i])]
        if holding:
            i = holding[0]
            holds = "may hold" if self.need is None else "holds"
            raise GpuMismatch(
                f"--gpu names {named} of the snapshot's {len(self.snapshot)} GPUs; "
                f"snapshot GPU {i} ({_short(self.snapshot[i]['uuid'])}) {holds} device "
                f"memory", hint="name a GPU for each snapshot GPU")

    def same_uuid(self) -> None:
        """Same UUID first, so that no fallback takes it."""
        for i in self.rest():
            pos = self.by_uuid.get(self.snapshot[i]["uuid"])
            if pos is not None and pos not in self.target.values():
                why = self.fits(self.snapshot[i], pos)
                if why:
                    raise GpuMismatch(f"snapshot GPU {i}: {why}",
                                      hint="free memory on it, or pick another with --gpu")
                self.target[i] = pos

    def same_chip(self) -> None:
        """The rest: the first free host GPU of the same chip with room."""
        for i in self.rest():
            snap = self.snapshot[i]
            free = [pos for pos in range(len(self.host)) if pos not in self.target.values()]
            reasons = [self.fits(snap, pos) for pos in free]
            ok = [pos for pos, why in zip(free, reasons) if why is None]
            if not ok:
                raise GpuMismatch(
                    f"snapshot GPU {i} ({_short(snap['uuid'])}, {snap['name']}) has no place "
                    f"on this host: " + "; ".join(r for r in reasons if r),
                    hint="the driver restores only onto the same chip with room for the data")
            self.target[i] = ok[0]
            gone = "absent" if snap["uuid"] not in self.by_uuid else "taken"
            self.notes.append(f"snapshot GPU {i} ({_short(snap['uuid'])}) {gone}; using "
                              f"{_label(self.host[ok[0]], ok[0])} (same chip)")

    def plan(self) -> RemapPlan:
        mapping = [(self.snapshot[i]["uuid"], self.host[self.target[i]]["uuid"])
                   for i in range(len(self.snapshot))]
        return RemapPlan(mapping=mapping, notes=self.notes)
