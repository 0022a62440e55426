"""Memory this process may still take: the host's MemAvailable, bounded by its memory cgroup.

gpusnap often runs inside a container (gpusnapd in a pod, a hook under a container engine)
whose memory cgroup allows far less than the host has: memory it takes past the cgroup's
limit gets it killed, whatever the host's /proc/meminfo says. So a buffer sized from host
memory (a --leave-running dump's page stream: store/pagestream.py) is sized from this.

    cgroup v2   /proc/self/cgroup "0::PATH": memory.max - memory.current, at PATH and every
                ancestor under /sys/fs/cgroup ("max": no limit at that level)
    cgroup v1   "N:...memory...:PATH": memory.limit_in_bytes - memory.usage_in_bytes, at PATH
                and its ancestors under /sys/fs/cgroup/memory (a limit past 2^62: none)

Which directories those are: cgroups.py. Whatever cannot be read counts as no limit.
"""

from __future__ import annotations

import os

import psutil

from . import cgroups

UNLIMITED = 1 << 62


def available(root: str = "/") -> int:
    """Bytes this process may still take (see the module's docstring)."""
    host = psutil.virtual_memory().available
    room = cgroup_room(root)
    return host if room is None else max(0, min(host, room))


def cgroup_room(root: str = "/") -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroup and its
    ancestors; None where no limit applies or none can be read. root: where /proc and
    /sys are (tests)."""
    rooms = []
    for version, here in cgroups.levels("memory", root):
        limit_file, usage_file = (("memory.max", "memory.current") if version == 2 else
                                  ("memory.limit_in_bytes", "memory.usage_in_bytes"))
        limit = cgroups.read_int(os.path.join(here, limit_file))
        if limit is not None and limit < UNLIMITED:
            rooms.append(limit - (cgroups.read_int(os.path.join(here, usage_file)) or 0))
    return min(rooms) if rooms else None
