"""CPUs this process may use: the ones it may run on, bounded by its CPU cgroup's quota.

gpusnapd in a pod limited to 2 CPUs on a 128-CPU node sees 128 in os.cpu_count(); worker
pools sized from that (store/parallel.py, store/pipecopy.py) would run dozens of
processes on two CPUs' worth of time, which the cgroup then throttles. So they are sized
from this.

    affinity    os.sched_getaffinity(0) (a cpuset, taskset)
    cgroup v2   cpu.max "QUOTA PERIOD" ("max": no quota) at the cgroup and each ancestor
    cgroup v1   cpu.cfs_quota_us / cpu.cfs_period_us (-1: no quota), the same levels

A quota counts as QUOTA / PERIOD CPUs, rounded up, at least 1 (cgroups.py says which
directories are read). Whatever cannot be read counts as no limit.
"""

from __future__ import annotations

import os

from . import cgroups


def count(root: str = "/") -> int:
    """CPUs this process may use (see the module's docstring), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_quota(root)
    return max(1, min(cpus, quota) if quota is not None else cpus)


def cgroup_quota(root: str = "/") -> int | None:
    """The tightest CPU quota of this process's cgroup and its ancestors, in CPUs (rounded
    up); None where none applies or none can be read."""
    quotas = []
    for version, here in cgroups.levels("cpu", root):
        if version == 2:
            fields = (cgroups.read_text(os.path.join(here, "cpu.max")) or "").split()
            quota, period = (fields + ["", ""])[:2]
        else:
            quota = cgroups.read_text(os.path.join(here, "cpu.cfs_quota_us")) or ""
            period = cgroups.read_text(os.path.join(here, "cpu.cfs_period_us")) or ""
        if quota.isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:
            quotas.append(max(1, -(-int(quota) // int(period))))
    return min(quotas) if quotas else None
