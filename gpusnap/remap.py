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
    plan = RemapPlan()
    if not snapshot_gpus:
        return plan
    tokens = _tokens(choice)
    if len(tokens) > len(snapshot_gpus):
        raise GpuMismatch(f"--gpu names {len(tokens)} GPUs; the snapshot had "
                          f"{len(snapshot_gpus)}")
    if len(host_gpus) < len(snapshot_gpus):
        raise GpuMismatch(f"the snapshot had {len(snapshot_gpus)} GPUs; this host has "
                          f"{len(host_gpus)}", hint="restore on a host with as many GPUs")

    def needs(snap: dict) -> int:
        return (need or {}).get(snap["uuid"], 0)

    def fits(snap: dict, pos: int) -> str | None:
        """Why host GPU pos cannot take snap, or None."""
        gpu = host_gpus[pos]
        if gpu["name"] != snap["name"]:
            return f"{_label(gpu, pos)} is not a {snap['name']}"
        want = needs(snap)
        if need is not None and want > gpu.get("memory_free", 0):
            return (f"{_label(gpu, pos)} has {_gib(gpu.get('memory_free', 0))} free; "
                    f"the snapshot needs {_gib(want)} there")
        return None

    order = list(range(len(snapshot_gpus)))
    if tokens and len(tokens) < len(snapshot_gpus) and need is not None:
        order.sort(key=lambda i: 0 if needs(snapshot_gpus[i]) else 1)
    target: dict[int, int] = {}                     # snapshot position -> host position
    for i, token in zip(order, tokens):
        pos = _resolve(token, host_gpus)
        if pos in target.values():
            raise UsageError(f"--gpu names {_label(host_gpus[pos], pos)} twice")
        why = fits(snapshot_gpus[i], pos)
        if why:
            raise GpuMismatch(f"snapshot GPU {i} cannot go to {why}")
        target[i] = pos
        plan.notes.append(f"snapshot GPU {i} ({_short(snapshot_gpus[i]['uuid'])}) onto "
                          f"{_label(host_gpus[pos], pos)} (--gpu)")

    rest = [i for i in range(len(snapshot_gpus)) if i not in target]
    if tokens:
        named = [i for i in rest if need is None or needs(snapshot_gpus[i])]
        if named:
            i = named[0]
            holds = "may hold" if need is None else "holds"
            raise GpuMismatch(
                f"--gpu names {len(tokens)} of the snapshot's {len(snapshot_gpus)} GPUs; "
                f"snapshot GPU {i} ({_short(snapshot_gpus[i]['uuid'])}) {holds} device "
                f"memory", hint="name a GPU for each snapshot GPU")

    by_uuid = {g["uuid"]: pos for pos, g in enumerate(host_gpus)}
    for i in rest:                                  # same UUID first, so no fallback takes it
        pos = by_uuid.get(snapshot_gpus[i]["uuid"])
        if pos is not None and pos not in target.values():
            why = fits(snapshot_gpus[i], pos)
            if why:
                raise GpuMismatch(f"snapshot GPU {i}: {why}",
                                  hint="free memory on it, or pick another with --gpu")
            target[i] = pos
    for i in rest:
        if i in target:
            continue
        snap = snapshot_gpus[i]
        free = [pos for pos in range(len(host_gpus)) if pos not in target.values()]
        reasons = [fits(snap, pos) for pos in free]
        ok = [pos for pos, why in zip(free, reasons) if why is None]
        if not ok:
            raise GpuMismatch(
                f"snapshot GPU {i} ({_short(snap['uuid'])}, {snap['name']}) has no place "
                f"on this host: " + "; ".join(r for r in reasons if r),
                hint="the driver restores only onto the same chip with room for the data")
        target[i] = ok[0]
        gone = "absent" if snap["uuid"] not in by_uuid else "taken"
        plan.notes.append(f"snapshot GPU {i} ({_short(snap['uuid'])}) {gone}; using "
                          f"{_label(host_gpus[ok[0]], ok[0])} (same chip)")

    plan.mapping = [(snapshot_gpus[i]["uuid"], host_gpus[target[i]]["uuid"])
                    for i in range(len(snapshot_gpus))]
    return plan
