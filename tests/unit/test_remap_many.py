"""Remap planning on 4- and 8-GPU hosts: every permutation of the GPUs, by index and by
UUID, a process on a subset of them, a snapshot from another host, and the container
device map that follows each plan."""

from __future__ import annotations

import itertools
import random

import pytest

from gpusnap.errors import GpuMismatch
from gpusnap.remap import GIB, plan_remap
from gpusnap.targets.devices import gpu_device_map

H200 = "NVIDIA H200"


def gpus(n: int, tag: str = "a", free: int = 100 * GIB) -> list[dict]:
    return [{"index": i, "minor": i, "uuid": f"GPU-{tag}{i:x}0000000-1111-2222-3333-444444444444",
             "name": H200, "memory_total": 141 * GIB, "memory_free": free} for i in range(n)]


def permutations(n: int, limit: int | None = None):
    """Every permutation of range(n), or `limit` of them drawn at random (seeded), the
    identity and the reversal always among them."""
    if limit is None:
        yield from itertools.permutations(range(n))
        return
    rng = random.Random(n)
    yield tuple(range(n))
    yield tuple(reversed(range(n)))
    for _ in range(limit):
        p = list(range(n))
        rng.shuffle(p)
        yield tuple(p)


@pytest.mark.parametrize("n,limit", [(4, None), (8, None)])
def test_every_permutation_is_planned_whole(n, limit):
    """--gpu p0,p1,...: snapshot GPU i onto host GPU p[i], for all n! orders."""
    snap, host = gpus(n), gpus(n)
    need = {g["uuid"]: 60 * GIB for g in snap}
    count = 0
    for p in permutations(n, limit):
        plan = plan_remap(snap, host, [",".join(map(str, p))], need)
        assert plan.mapping == [(snap[i]["uuid"], host[p[i]]["uuid"]) for i in range(n)]
        assert (plan.pairs is None) == (p == tuple(range(n)))
        count += 1
    assert count == (24 if n == 4 else 40320)


@pytest.mark.parametrize("n", [4, 8])
def test_permutations_by_uuid_prefix_and_device_map(n):
    snap, host = gpus(n), gpus(n)
    for p in permutations(n, 200):
        plan = plan_remap(snap, host, [host[j]["uuid"][:7] for j in p])
        assert [new for _, new in plan.mapping] == [host[j]["uuid"] for j in p]
        dm = gpu_device_map(snap, host, plan.pairs)
        assert dm == {f"/dev/nvidia{i}": f"/dev/nvidia{p[i]}" for i in range(n) if p[i] != i}


@pytest.mark.parametrize("n,k", [(4, 2), (8, 2), (8, 4)])
def test_a_tp_k_job_onto_any_k_of_n_gpus(n, k):
    """A process that saw k GPUs (a TP=k job) goes onto any ordered k GPUs of n."""
    snap, host = gpus(k), gpus(n)
    seen = 0
    for chosen in itertools.permutations(range(n), k):
        plan = plan_remap(snap, host, [",".join(map(str, chosen))])
        assert [new for _, new in plan.mapping] == [host[j]["uuid"] for j in chosen]
        seen += 1
    assert seen == len(list(itertools.permutations(range(n), k)))


@pytest.mark.parametrize("n", [4, 8])
def test_a_snapshot_from_another_host_fills_the_gpus_in_order(n):
    plan = plan_remap(gpus(n, "b"), gpus(n))
    assert [new for _, new in plan.mapping] == [g["uuid"] for g in gpus(n)]
    assert len(plan.notes) == n


@pytest.mark.parametrize("n", [4, 8])
def test_a_full_gpu_is_skipped_and_no_room_is_refused(n):
    host = gpus(n)
    host[0]["memory_free"] = 1 * GIB
    snap = gpus(n - 1, "b")
    need = {g["uuid"]: 60 * GIB for g in snap}
    plan = plan_remap(snap, host, None, need)
    assert [new for _, new in plan.mapping] == [g["uuid"] for g in host[1:]]
    with pytest.raises(GpuMismatch, match="no place"):
        plan_remap(gpus(n, "b"), host, None, {g["uuid"]: 60 * GIB for g in gpus(n, "b")})
