"""Where this process's cgroup and its ancestors keep their files: what hostmem.py and
hostcpu.py read their limits from.

    cgroup v2   /proc/self/cgroup "0::PATH": /sys/fs/cgroup/PATH and each ancestor
    cgroup v1   "N:CONTROLLERS:PATH", the line whose controllers hold the one asked for:
                /sys/fs/cgroup/CONTROLLER/PATH and each ancestor

A cgroup namespace shows PATH as "/", and a PATH that is not under the mount (another
namespace's) means the mount's root is this process's own: both read the mount's root.
Whatever cannot be read is left out: no limit known there.
"""

from __future__ import annotations

import os


def levels(controller: str, root: str = "/") -> list[tuple[int, str]]:
    """(cgroup version, directory) of this process's cgroup and each ancestor, deepest
    first, in the v2 hierarchy and in the v1 hierarchy of controller. root: where /proc
    and /sys are (tests)."""
    try:
        with open(os.path.join(root, "proc/self/cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        ident, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "" and ident == "0":
            out += [(2, d) for d in _up(os.path.join(root, "sys/fs/cgroup"), path)]
        elif controller in controllers.split(","):
            out += [(1, d) for d in _up(os.path.join(root, "sys/fs/cgroup", controller), path)]
    return out


def read_text(path: str) -> str | None:
    """A cgroup file's content, stripped; None where it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def read_int(path: str) -> int | None:
    """A cgroup file holding a count; None where it cannot be read or is no count."""
    raw = read_text(path)
    return int(raw) if raw is not None and raw.isdigit() else None


def _up(mount: str, path: str) -> list[str]:
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    if not os.path.isdir(os.path.join(mount, *parts)):
        parts = []
    out = [os.path.join(mount, *parts)]
    while parts:
        parts.pop()
        out.append(os.path.join(mount, *parts))
    return out
