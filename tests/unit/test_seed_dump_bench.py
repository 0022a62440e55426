"""benchmarks/seed_dump.py's pure parts: the environment of each --fsync mode, the landing line."""

from __future__ import annotations

import pytest

from benchmarks import seed_dump
from benchmarks.seed_dump import mode_env


def test_a_plain_mode_sets_the_fsync_alone():
    assert mode_env("auto") == {"GPUSNAP_FSYNC": "auto"}


def test_slots_and_compression_in_either_order():
    want = {"GPUSNAP_FSYNC": "each", "GPUSNAP_STREAM_SLOTS": "128", "GPUSNAP_COMPRESS": "bf16"}
    assert mode_env("each:s128:cbf16") == want
    assert mode_env("each:cbf16:s128") == want


def test_the_prefault_part():
    assert mode_env("auto:p") == {"GPUSNAP_FSYNC": "auto", "GPUSNAP_STREAM_PREFAULT": "1"}
    assert mode_env("auto:p0") == {"GPUSNAP_FSYNC": "auto", "GPUSNAP_STREAM_PREFAULT": "0"}


def test_the_workers_part():
    assert mode_env("auto:t32:p0") == {"GPUSNAP_FSYNC": "auto", "GPUSNAP_THREADS": "32",
                                       "GPUSNAP_STREAM_PREFAULT": "0"}


def test_the_nice_part():
    assert mode_env("auto:cbf16:n10") == {"GPUSNAP_FSYNC": "auto", "GPUSNAP_COMPRESS": "bf16",
                                          "GPUSNAP_STREAM_NICE": "10"}


@pytest.mark.parametrize("mode", ["auto:t", "auto:tx", "auto:x", "auto:s", "auto:sabc", "auto:c", "auto:n", "auto:nx", "auto:px"])
def test_an_unknown_part_is_refused(mode):
    with pytest.raises(SystemExit):
        mode_env(mode)


def test_the_landing_line_splits_the_new_bytes_at_crius_end():
    run = {"bytes_new": 10e9, "timings": {"stream_close_s": 4.0, "stream_new_gb_at_close": 4.0,
                                          "stream_end_s": 7.0}}
    (line,) = seed_dump._landing_lines([("empty", [run]), ("old", [{"bytes_new": 1, "timings": {}}])])
    assert "empty: 4.00 of 10.00 GB new stored in CRIU's 4.00 s (1.00 GB/s), the rest at 2.00 GB/s in 3.00 s" in line
    assert "old" not in line
    assert seed_dump._landing_lines([("old", [{"bytes_new": 1, "timings": {}}])]) == []


def test_the_seed_workers_part():
    assert mode_env("auto:w8") == {"GPUSNAP_FSYNC": "auto", "GPUSNAP_SEED_WORKERS": "8"}


def test_the_private_slots_part():
    assert mode_env("auto:pv") == {"GPUSNAP_FSYNC": "auto", "GPUSNAP_STREAM_PRIVATE": "1"}
    assert mode_env("auto:sh") == {"GPUSNAP_FSYNC": "auto", "GPUSNAP_STREAM_PRIVATE": "0"}
