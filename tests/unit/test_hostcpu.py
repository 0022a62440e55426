"""hostcpu: the CPUs a process may use, its affinity and its CPU cgroup's quota included,
read from a /proc and /sys laid out as cgroup v1 and v2 hosts and containers lay them out;
and cgroups.py's walk up the hierarchy that hostmem.py shares."""

from __future__ import annotations

import os

import pytest
from conftest import cgroup_tree

from gpusnap import cgroups, hostcpu


def test_v2_the_tightest_quota_up_the_hierarchy_rounded_up(tmp_path):
    root = cgroup_tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/cpu.max": "max 100000",
        "kubepods/pod1/cpu.max": "250000 100000",           # 2.5 CPUs: 3
        "kubepods/pod1/ctr/cpu.max": "max 100000",
    })
    assert hostcpu.cgroup_quota(root) == 3


def test_v2_a_quota_under_one_cpu_counts_as_one(tmp_path):
    assert hostcpu.cgroup_quota(cgroup_tree(tmp_path, "0::/\n", {"cpu.max": "20000 100000"})) == 1


def test_v1_cfs_quota_and_no_quota(tmp_path):
    root = cgroup_tree(tmp_path, "3:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n", {
        "cpu/docker/abc/cpu.cfs_quota_us": "400000", "cpu/docker/abc/cpu.cfs_period_us": "100000",
        "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
    })
    assert hostcpu.cgroup_quota(root) == 4
    free = cgroup_tree(tmp_path / "free", "3:cpu,cpuacct:/\n", {
        "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert hostcpu.cgroup_quota(free) is None


@pytest.mark.parametrize("cgroup", ["", "garbage\n", "0::/../../etc\n"])
def test_unreadable_or_odd_is_no_quota(tmp_path, cgroup):
    assert hostcpu.cgroup_quota(cgroup_tree(tmp_path, cgroup, {"cpu.max": "0 100000"})) is None
    assert hostcpu.cgroup_quota(str(tmp_path / "nowhere")) is None


def test_count_is_the_affinity_within_the_quota(tmp_path):
    mine = len(os.sched_getaffinity(0))
    assert hostcpu.count(str(tmp_path / "nowhere")) == mine
    assert hostcpu.count(cgroup_tree(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})) == 1
    assert hostcpu.count(cgroup_tree(tmp_path / "big", "0::/\n", {"cpu.max": "99900000 100000"})) == mine


def test_levels_deepest_first_and_another_namespaces_path_reads_the_root(tmp_path):
    root = cgroup_tree(tmp_path, "0::/a/b\n4:memory:/elsewhere\n", {"a/b/x": "", "memory/x": ""})
    base = os.path.join(root, "sys/fs/cgroup")
    assert cgroups.levels("memory", root) == [
        (2, os.path.join(base, "a", "b")), (2, os.path.join(base, "a")), (2, base),
        (1, os.path.join(base, "memory"))]
    assert cgroups.levels("cpu", root) == [
        (2, os.path.join(base, "a", "b")), (2, os.path.join(base, "a")), (2, base)]


def test_doctor_names_the_quota_that_bounds_the_workers(monkeypatch):
    from gpusnap.engine import doctor
    monkeypatch.delenv("GPUSNAP_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(hostcpu, "cgroup_quota", lambda root="/": 3)
    monkeypatch.setattr(hostcpu, "count", lambda root="/": 3)
    [check] = doctor._cpus()
    assert check.status == "ok"
    assert check.detail.startswith("3 for gpusnap (of 128 on the host: its CPU cgroup's quota): 3 workers")
