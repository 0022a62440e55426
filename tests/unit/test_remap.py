"""plan_remap: snapshot GPUs + host GPUs + --gpu -> a whole map, or a refusal."""

from __future__ import annotations

import random

import pytest

from gpusnap.errors import GpuMismatch, UsageError
from gpusnap.remap import GIB, RemapPlan, plan_remap

H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
U = [f"GPU-{i:02x}a0b0c0-1111-2222-3333-444444444444" for i in range(8)]


def snap(*specs):
    """snap((uuid, name), ...) -> snapshot GPU dicts."""
    return [{"uuid": u, "name": n, "memory_total": 80 * GIB} for u, n in specs]


def host(*specs, free=70 * GIB):
    """host((uuid, name[, free]), ...) -> host GPU dicts, indexed by position."""
    return [{"index": i, "uuid": s[0], "name": s[1], "memory_total": 80 * GIB,
             "memory_free": s[2] if len(s) > 2 else free} for i, s in enumerate(specs)]


def test_no_snapshot_gpus():
    plan = plan_remap([], host((U[0], H100)))
    assert plan.mapping == [] and plan.pairs is None and plan.identity


def test_identity_needs_no_pairs():
    plan = plan_remap(snap((U[0], H100), (U[1], H100)), host((U[0], H100), (U[1], H100)))
    assert plan.mapping == [(U[0], U[0]), (U[1], U[1])]
    assert plan.pairs is None and plan.notes == []


def test_identity_when_host_lists_gpus_in_another_order():
    plan = plan_remap(snap((U[0], H100), (U[1], H100)), host((U[1], H100), (U[0], H100)))
    assert plan.pairs is None


def test_identity_ignores_extra_host_gpus():
    plan = plan_remap(snap((U[1], H100)), host((U[0], H100), (U[1], H100), (U[2], H100)))
    assert plan.mapping == [(U[1], U[1])] and plan.pairs is None


def test_absent_gpu_goes_to_a_free_gpu_of_the_same_chip():
    plan = plan_remap(snap((U[5], H100)), host((U[0], A100), (U[1], H100)))
    assert plan.pairs == [(U[5], U[1])]
    assert len(plan.notes) == 1
    assert "absent" in plan.notes[0] and "GPU 1" in plan.notes[0] and "same chip" in plan.notes[0]


def test_present_uuids_are_reserved_before_fallbacks_pick():
    # snapshot GPU 0 is gone; GPU 1 is here and must keep its own card
    plan = plan_remap(snap((U[5], H100), (U[0], H100)), host((U[0], H100), (U[1], H100)))
    assert plan.mapping == [(U[5], U[1]), (U[0], U[0])]
    assert plan.pairs == plan.mapping       # whole map, identity pair included


def test_whole_new_host():
    plan = plan_remap(snap((U[5], H100), (U[6], H100)),
                      host((U[0], H100), (U[1], H100), (U[2], H100)))
    assert plan.mapping == [(U[5], U[0]), (U[6], U[1])]
    assert len(plan.notes) == 2


def test_other_chip_is_refused():
    with pytest.raises(GpuMismatch, match="not a NVIDIA H100") as info:
        plan_remap(snap((U[5], H100)), host((U[0], A100)))
    assert info.value.exit_code == 22 and info.value.hint


def test_too_few_host_gpus_is_refused():
    with pytest.raises(GpuMismatch, match="had 2 GPUs; this host has 1"):
        plan_remap(snap((U[0], H100), (U[1], H100)), host((U[0], H100)))


def test_short_free_memory_on_own_gpu_is_refused():
    with pytest.raises(GpuMismatch, match="2.0 GiB free; the snapshot needs 10.0 GiB"):
        plan_remap(snap((U[0], H100)), host((U[0], H100, 2 * GIB)), need={U[0]: 10 * GIB})


def test_unknown_need_is_not_checked():
    plan = plan_remap(snap((U[0], H100)), host((U[0], H100, 0)), need=None)
    assert plan.pairs is None


def test_fallback_skips_gpus_without_room():
    plan = plan_remap(snap((U[5], H100)), host((U[0], H100, GIB), (U[1], H100, 40 * GIB)),
                      need={U[5]: 20 * GIB})
    assert plan.pairs == [(U[5], U[1])]


def test_fallback_with_no_room_anywhere_says_why():
    with pytest.raises(GpuMismatch, match="no place on this host") as info:
        plan_remap(snap((U[5], H100)), host((U[0], H100, GIB), (U[1], A100)),
                   need={U[5]: 20 * GIB})
    assert "1.0 GiB free" in info.value.message and "not a NVIDIA H100" in info.value.message


def test_gpu_choice_swap_is_a_whole_permutation():
    plan = plan_remap(snap((U[0], H100), (U[1], H100)), host((U[0], H100), (U[1], H100)),
                      choice=["1", "0"])
    assert plan.pairs == [(U[0], U[1]), (U[1], U[0])]
    assert all("(--gpu)" in n for n in plan.notes)


def test_gpu_choice_as_one_comma_string():
    plan = plan_remap(snap((U[0], H100), (U[1], H100)), host((U[0], H100), (U[1], H100)),
                      choice=["1,0"])
    assert plan.pairs == [(U[0], U[1]), (U[1], U[0])]


def test_single_choice_completes_the_map_for_gpus_without_memory():
    # the process saw two GPUs but only used GPU 0: "--gpu 1" moves it and swaps
    plan = plan_remap(snap((U[0], H100), (U[1], H100)), host((U[0], H100), (U[1], H100)),
                      choice=["1"], need={U[0]: 5 * GIB})
    assert plan.pairs == [(U[0], U[1]), (U[1], U[0])]
    assert "taken" in plan.notes[1]


def test_single_choice_refused_when_an_unnamed_gpu_holds_memory():
    with pytest.raises(GpuMismatch, match="holds device memory"):
        plan_remap(snap((U[0], H100), (U[1], H100)), host((U[0], H100), (U[1], H100)),
                   choice=["1"], need={U[0]: GIB, U[1]: GIB})
    with pytest.raises(GpuMismatch, match="may hold device memory"):
        plan_remap(snap((U[0], H100), (U[1], H100)), host((U[0], H100), (U[1], H100)),
                   choice=["1"])


def test_choice_by_uuid_and_prefix():
    s, h = snap((U[0], H100)), host((U[0], H100), (U[3], H100))
    for token in (U[3], U[3].lower(), U[3][:12], U[3][4:12], U[3][:12].upper()):
        assert plan_remap(s, h, choice=[token]).pairs == [(U[0], U[3])], token


def test_choice_ambiguous_prefix():
    with pytest.raises(UsageError, match="matches 2 GPUs"):
        plan_remap(snap((U[0], H100)), host((U[0], H100), (U[1], H100)), choice=["GPU-0"])


def test_choice_unknown_gpu():
    with pytest.raises(GpuMismatch, match="no GPU 7") as info:
        plan_remap(snap((U[0], H100)), host((U[0], H100)), choice=["7"])
    assert "GPU 0" in info.value.hint
    with pytest.raises(GpuMismatch, match="no GPU of this host has that UUID"):
        plan_remap(snap((U[0], H100)), host((U[0], H100)), choice=["GPU-deadbeef"])


def test_choice_duplicate_and_too_many():
    s2, h2 = snap((U[0], H100), (U[1], H100)), host((U[0], H100), (U[1], H100))
    with pytest.raises(UsageError, match="twice"):
        plan_remap(s2, h2, choice=["0", "0"])
    with pytest.raises(GpuMismatch, match="names 3 GPUs; the snapshot had 2"):
        plan_remap(s2, host((U[0], H100), (U[1], H100), (U[2], H100)), choice=["0", "1", "2"])


def test_choice_of_other_chip_or_too_full_gpu():
    with pytest.raises(GpuMismatch, match="not a NVIDIA H100"):
        plan_remap(snap((U[0], H100)), host((U[0], H100), (U[1], A100)), choice=["1"])
    with pytest.raises(GpuMismatch, match="needs 9.0 GiB"):
        plan_remap(snap((U[0], H100)), host((U[0], H100), (U[1], H100, GIB)), choice=["1"],
                   need={U[0]: 9 * GIB})


def test_choice_of_own_gpu_is_identity():
    plan = plan_remap(snap((U[0], H100)), host((U[0], H100), (U[1], H100)), choice=["0"])
    assert plan.pairs is None


def test_choice_uses_host_indexes_not_positions():
    h = host((U[2], H100), (U[3], H100))
    h[0]["index"], h[1]["index"] = 2, 3
    plan = plan_remap(snap((U[0], H100)), h, choice=["3"])
    assert plan.pairs == [(U[0], U[3])]


def test_to_dict():
    plan = plan_remap(snap((U[5], H100)), host((U[1], H100)))
    d = plan.to_dict()
    assert d["mapping"] == [[U[5], U[1]]] and d["pairs"] == [[U[5], U[1]]]
    assert d["notes"] == plan.notes
    assert RemapPlan([(U[0], U[0])]).to_dict()["pairs"] is None


@pytest.mark.parametrize("seed", range(300))
def test_any_plan_is_whole_injective_and_fits(seed):
    rng = random.Random(seed)
    chips = [H100, A100]
    snapshot = snap(*[(U[rng.randrange(8)], rng.choice(chips)) for _ in range(rng.randint(1, 3))])
    snapshot = list({g["uuid"]: g for g in snapshot}.values())
    hosts = host(*[(U[rng.randrange(8)], rng.choice(chips), rng.randrange(0, 80) * GIB)
                   for _ in range(rng.randint(1, 4))])
    hosts = list({g["uuid"]: g for g in hosts}.values())
    need = {g["uuid"]: rng.randrange(0, 40) * GIB for g in snapshot if rng.random() < 0.7}
    choice = None
    if rng.random() < 0.3:
        choice = [str(rng.randrange(len(hosts) + 1)) for _ in range(rng.randint(1, 2))]
    try:
        plan = plan_remap(snapshot, hosts, choice, need)
    except (GpuMismatch, UsageError):
        return
    olds = [o for o, _ in plan.mapping]
    news = [n for _, n in plan.mapping]
    assert olds == [g["uuid"] for g in snapshot]
    assert len(set(news)) == len(news)
    by_uuid = {g["uuid"]: g for g in hosts}
    for g, new in zip(snapshot, news):
        assert by_uuid[new]["name"] == g["name"]
        assert need.get(g["uuid"], 0) <= by_uuid[new]["memory_free"]
    assert (plan.pairs is None) == all(o == n for o, n in plan.mapping)


def test_fewer_gpus_named_go_to_the_snapshot_gpus_that_hold_memory():
    """Seen on a two-GPU H200 host: a process that sees both GPUs and uses GPU 1,
    restored with --gpu 0, must move its one used GPU onto host GPU 0 (the driver then
    needs the swap, so the unused one goes to GPU 1)."""
    snap = [{"uuid": "GPU-a", "name": "H200", "memory_total": 1}, {"uuid": "GPU-b", "name": "H200", "memory_total": 1}]
    host = [{"uuid": "GPU-a", "name": "H200", "memory_total": 1, "memory_free": 10 << 30, "index": 0},
            {"uuid": "GPU-b", "name": "H200", "memory_total": 1, "memory_free": 10 << 30, "index": 1}]
    plan = plan_remap(snap, host, ["0"], {"GPU-b": 1 << 30})
    assert dict(plan.mapping) == {"GPU-b": "GPU-a", "GPU-a": "GPU-b"}
    assert plan.pairs is not None
