"""hostmem: the memory a process may take, its cgroup's limit included, read from a /proc
and /sys laid out as cgroup v1 and v2 hosts and containers lay them out."""

from __future__ import annotations

import pytest
from conftest import cgroup_tree

from gpusnap import hostmem

G = 1 << 30


def test_v2_the_tightest_level_up_the_hierarchy(tmp_path):
    root = cgroup_tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/memory.max": str(64 * G), "kubepods/memory.current": str(10 * G),
        "kubepods/pod1/memory.max": str(8 * G), "kubepods/pod1/memory.current": str(3 * G),
        "kubepods/pod1/ctr/memory.max": "max", "kubepods/pod1/ctr/memory.current": str(3 * G),
    })
    assert hostmem.cgroup_room(root) == 5 * G


def test_v2_in_a_cgroup_namespace_the_mounts_root_is_ours(tmp_path):
    root = cgroup_tree(tmp_path, "0::/\n", {"memory.max": str(4 * G), "memory.current": str(G)})
    assert hostmem.cgroup_room(root) == 3 * G


def test_v1_memory_controller_and_an_unlimited_host(tmp_path):
    root = cgroup_tree(tmp_path, "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n", {
        "memory/docker/abc/memory.limit_in_bytes": str(2 * G),
        "memory/docker/abc/memory.usage_in_bytes": str(G // 2),
        "memory/memory.limit_in_bytes": "9223372036854771712",
    })
    assert hostmem.cgroup_room(root) == G + G // 2
    free = cgroup_tree(tmp_path / "free", "4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712"})
    assert hostmem.cgroup_room(free) is None


def test_v1_a_path_from_another_namespace_reads_the_mounts_root(tmp_path):
    root = cgroup_tree(tmp_path, "4:memory:/elsewhere/abc\n", {
        "memory/memory.limit_in_bytes": str(3 * G), "memory/memory.usage_in_bytes": str(G)})
    assert hostmem.cgroup_room(root) == 2 * G


@pytest.mark.parametrize("cgroup", ["", "garbage\n", "0::/../../etc\n"])
def test_unreadable_or_odd_is_no_limit(tmp_path, cgroup):
    assert hostmem.cgroup_room(cgroup_tree(tmp_path, cgroup, {})) is None
    assert hostmem.cgroup_room(str(tmp_path / "nowhere")) is None


def test_available_is_the_smaller_of_host_and_cgroup(tmp_path):
    root = cgroup_tree(tmp_path, "0::/\n", {"memory.max": str(G), "memory.current": str(2 * G)})
    assert hostmem.available(root) == 0                  # over its limit already: nothing
    assert hostmem.available(str(tmp_path / "nowhere")) > 0


def test_doctor_says_how_much_a_dump_may_buffer(monkeypatch):
    from gpusnap.engine import doctor
    monkeypatch.delenv("GPUSNAP_STREAM_SLOTS", raising=False)
    monkeypatch.setattr(hostmem, "available", lambda root="/": 40 * G)
    monkeypatch.setattr(hostmem, "cgroup_room", lambda root="/": None)
    [check] = doctor._dump_buffer()
    assert check.status == "ok" and "up to 10.0 GiB of pages" in check.detail
    monkeypatch.setattr(hostmem, "available", lambda root="/": 2 * G)
    monkeypatch.setattr(hostmem, "cgroup_room", lambda root="/": 2 * G)
    [check] = doctor._dump_buffer()
    assert check.status == "warn" and "512 MiB" in check.detail and "cgroup" in check.detail
    monkeypatch.setenv("GPUSNAP_STREAM_SLOTS", "40")
    [check] = doctor._dump_buffer()
    assert check.status == "ok" and "fixes 40 slots (640 MiB)" in check.detail


def test_doctor_says_where_a_dumps_slots_go(monkeypatch):
    """Private huge pages where a worker may read gpusnap's memory; shared, with a warning
    and the fix, where it may not; shared without one where GPUSNAP_STREAM_PRIVATE=0."""
    from gpusnap.engine import doctor
    from gpusnap.store import pagestream
    monkeypatch.delenv("GPUSNAP_STREAM_PRIVATE", raising=False)
    monkeypatch.setattr(pagestream, "workers_may_read", lambda: True)
    [check] = doctor._dump_slots()
    assert check.status == "ok" and "huge pages" in check.detail and "--leave-running" in check.detail
    monkeypatch.setenv("GPUSNAP_STREAM_PRIVATE", "1")
    [check] = doctor._dump_slots()
    assert check.status == "ok" and "every dump's" in check.detail
    monkeypatch.setattr(pagestream, "workers_may_read", lambda: False)
    [check] = doctor._dump_slots()
    assert check.status == "warn" and "CAP_SYS_PTRACE" in check.fix
    monkeypatch.setenv("GPUSNAP_STREAM_PRIVATE", "0")
    [check] = doctor._dump_slots()
    assert check.status == "ok" and "GPUSNAP_STREAM_PRIVATE=0" in check.detail
