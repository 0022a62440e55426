"""Memory this process may still take: the host's MemAvailable, bounded by its memory cgroup.

gpusnap often runs inside a container (gpusnapd in a pod, a hook under a container engine)
whose memory cgroup allows far less than the host has: memory it takes past the cgroup's
limit gets it killed, whatever the host's /proc/meminfo says. So a buffer sized from host
memory (a --leave-running dump's page stream: store/pagestream.py) is sized from this.

    cgroup v2   /proc/self/cgroup "0::PATH": memory.max - memory.current, at PATH and every
                ancestor under /sys/fs/cgroup ("max": no limit at that level)
    cgroup v1   "N:...memory...:PATH": memory.limit_in_bytes - memory.usage_in_bytes, at PATH
                and its ancestors under /sys/fs/cgroup/memory (a limit past 2^62: none)

A cgroup namespace shows PATH as "/": the files at the mount's root are then the
container's own. Whatever cannot be read counts as no limit.
"""

from __future__ import annotations

import os

import psutil

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
    try:
        with open(os.path.join(root, "proc/self/cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _id, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "" and _id == "0":
            rooms += _levels(os.path.join(root, "sys/fs/cgroup"), path, "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            rooms += _levels(os.path.join(root, "sys/fs/cgroup/memory"), path,
                             "memory.limit_in_bytes", "memory.usage_in_bytes")
    return min(rooms) if rooms else None


def _levels(mount: str, path: str, limit_file: str, usage_file: str) -> list[int]:
    """limit - usage at mount/path and each ancestor up to mount (levels with a limit)."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    if not os.path.isdir(os.path.join(mount, *parts)):
        parts = []                  # another namespace's path: the mount's root is ours
    out = []
    while True:
        here = os.path.join(mount, *parts)
        limit = _read_int(os.path.join(here, limit_file))
        if limit is not None and limit < UNLIMITED:
            usage = _read_int(os.path.join(here, usage_file)) or 0
            out.append(limit - usage)
        if not parts:
            return out
        parts.pop()


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            raw = f.read().strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None
