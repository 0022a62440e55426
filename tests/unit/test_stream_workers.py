"""How many workers a dump's page stream forks: more than the CPUs only where each
chunk costs CPU to encode (store/parallel.py's stream_workers)."""

import os

from gpusnap.store import codec, parallel


def test_only_bf16_and_real_zstd_levels_count_as_compressing():
    assert codec.compresses(codec.BF16)
    assert codec.compresses(1) and codec.compresses(19)
    assert not codec.compresses(codec.FAST)
    assert not codec.compresses(codec.NO_COMPRESSION)


def test_a_compressing_stream_gets_twice_the_cpus_at_most_32(monkeypatch):
    monkeypatch.delenv("GPUSNAP_THREADS", raising=False)
    for cpus, want in ((1, 2), (2, 4), (8, 16), (16, 32), (64, 32)):
        monkeypatch.setattr(os, "cpu_count", lambda c=cpus: c)
        assert parallel.stream_workers(True) == want
        assert parallel.stream_workers(False) == parallel.workers()


def test_gpusnap_threads_decides_where_set(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("GPUSNAP_THREADS", "5")
    assert parallel.stream_workers(True) == 5
    assert parallel.stream_workers(False) == 5
    monkeypatch.setenv("GPUSNAP_THREADS", "zero")           # not a count: the default
    assert parallel.stream_workers(True) == 32
