"""`gpusnap switch`: where IN fits beside OUT (pure). Its refusals that need no CUDA are
in test_parked.py, with suspend's and resume's."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpusnap.engine.switch import MARGIN, lacks_room

GIB = 1 << 30


def _gpu(uuid, free_gib):
    return {"uuid": uuid, "name": "H200", "memory_free": int(free_gib * GIB)}


def test_fits_beside_with_its_weights_and_the_margin():
    need = {"GPU-a": 2 * GIB}
    assert lacks_room(need, 16 * GIB, None, [_gpu("GPU-a", 19.5)]) is None
    why = lacks_room(need, 16 * GIB, None, [_gpu("GPU-a", 18.5)])
    assert why and "GPU-a" in why and "19.0 GiB wanted" in why
    # moved by --gpu: the room that counts is the new GPU's
    assert lacks_room(need, 0, [("GPU-a", "GPU-b")], [_gpu("GPU-a", 0), _gpu("GPU-b", 4)]) is None
    assert lacks_room(need, 0, [("GPU-a", "GPU-b")], [_gpu("GPU-a", 80), _gpu("GPU-b", 2)])
    # a GPU that is not there has no room; nothing held: nothing wanted
    assert lacks_room(need, 0, None, [_gpu("GPU-b", 80)])
    assert lacks_room({"GPU-a": 0}, 16 * GIB, None, []) is None


@given(st.dictionaries(st.sampled_from(["GPU-a", "GPU-b", "GPU-c"]), st.integers(0, 64 * GIB)),
       st.integers(0, 128 * GIB), st.lists(st.integers(0, 200 * GIB), min_size=3, max_size=3))
def test_room_is_what_each_gpu_needs_and_its_share_of_the_weights(need, weights, frees):
    host = [{"uuid": u, "memory_free": f} for u, f in zip(["GPU-a", "GPU-b", "GPU-c"], frees)]
    free = {g["uuid"]: g["memory_free"] for g in host}
    holding = [u for u, n in need.items() if n]
    fits = all(free[u] >= need[u] + weights // len(holding) + MARGIN for u in holding)
    assert (lacks_room(need, weights, None, host) is None) == fits
