"""Files a process tree holds that were deleted: CRIU stores each one whole in the images
(a "ghost file") and refuses one larger than its --ghost-limit (1 MiB by default). NCCL,
for one, maps a shared-memory file of tens of MiB from /dev/shm and unlinks it.

    ghost_limit(sizes)    pure: the limit a dump needs, or None (CRIU's default will do)
    scan(tree)            the sizes of the deleted regular files the tree maps or holds open
"""

from __future__ import annotations

import os
import stat

from . import fds

CRIU_DEFAULT = 1 << 20
_NOT_GHOSTS = ("/memfd:", "/SYSV", "/dev/zero", "/anon_hugepage")   # CRIU dumps these itself


def ghost_limit(sizes: list[int]) -> int | None:
    """A --ghost-limit that lets CRIU store every one of sizes, or None where its default
    does: the largest, rounded up to a MiB."""
    largest = max(sizes, default=0)
    if largest <= CRIU_DEFAULT:
        return None
    return -(-largest // (1 << 20)) << 20


def scan(tree: list[int]) -> list[int]:
    """Sizes of the deleted regular files mapped (maps) or held open (fd) by the tree,
    each once; empty ones, a process that is gone, or a file that cannot be looked at
    are skipped."""
    sizes: dict[tuple[int, int], int] = {}
    for pid in tree:
        for path in _deleted(pid):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size:
                sizes[(st.st_dev, st.st_ino)] = st.st_size
    return list(sizes.values())


def _deleted(pid: int) -> list[str]:
    """/proc paths that open the tree's deleted files: map_files entries and fd links."""
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and _ghost(parts[5]):
                    out.append(f"/proc/{pid}/map_files/{parts[0]}")
    except OSError:
        pass
    return out + [f"/proc/{pid}/fd/{fd}" for fd, link in fds.links(pid).items() if _ghost(link)]


def _ghost(name: str) -> bool:
    """A deleted file's name as /proc shows it, and not one CRIU dumps its own way."""
    return name.startswith("/") and name.endswith(" (deleted)") and not name.startswith(_NOT_GHOSTS)
