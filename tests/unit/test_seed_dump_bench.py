"""benchmarks/seed_dump.py's pure part: the environment of each --fsync mode."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("mode", ["auto:t", "auto:tx", "auto:x", "auto:s", "auto:sabc", "auto:c", "auto:n", "auto:px"])
def test_an_unknown_part_is_refused(mode):
    with pytest.raises(SystemExit):
        mode_env(mode)
