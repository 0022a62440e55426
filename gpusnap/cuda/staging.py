"""The driver's staging memory: where a CUDA checkpoint puts the device memory it moves.

cuCheckpointProcessCheckpoint copies a process's device memory into host memory of that
process: new private anonymous mappings the size of what it moved (on an H200, one
mapping of 6.6 GB for an 8B server). A dump records the ranges each CUDA pid gained
across its lock and checkpoint (added()); a restore on the uffd page path can then fill
those last, while the driver's restore already reads them (engine/pagepath.py,
GPUSNAP_UFFD_OVERLAP). The ranges only order the fill: every page is placed before a
restore reports success, whatever a manifest says they are.
"""

from __future__ import annotations

MIN_BYTES = 2 << 20          # smaller additions are the driver's own bookkeeping, not staging


def anon_ranges(pid: int) -> list[tuple[int, int]]:
    """The private anonymous mappings of pid ([start, end) from /proc/PID/maps: no path,
    no inode); [] when pid is gone or unreadable."""
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 5 and parts[1][3:4] == "p" and parts[4] == "0":
                    start, _, end = parts[0].partition("-")
                    out.append((int(start, 16), int(end, 16)))
    except (OSError, ValueError):
        return []
    return out


def snapshot(pids: list[int]) -> dict[int, list[tuple[int, int]]]:
    """Each pid's private anonymous mappings now (before the lock)."""
    return {p: anon_ranges(p) for p in pids}


def gained(before: dict[int, list[tuple[int, int]]]) -> dict[str, list[list[int]]]:
    """What each pid of before gained since (after the checkpoint), as CudaFacts.staging."""
    out = {}
    for p, old in before.items():
        new = added(old, anon_ranges(p))
        if new:
            out[str(p)] = [[s, e] for s, e in new]
    return out


def added(before: list[tuple[int, int]], after: list[tuple[int, int]],
          min_bytes: int = MIN_BYTES) -> list[tuple[int, int]]:
    """The parts of after's ranges that no range of before covered, at least min_bytes
    each (a new mapping the kernel merged into a neighbour comes out as its new part)."""
    old = sorted(before)
    out = []
    for start, end in sorted(after):
        pos = start
        for o_start, o_end in old:
            if o_end <= pos or o_start >= end:
                continue
            if o_start > pos:
                out.append((pos, o_start))
            pos = max(pos, o_end)
        if pos < end:
            out.append((pos, end))
    return [(s, e) for s, e in out if e - s >= min_bytes]


def late_pieces(pieces: list[tuple], ranges: dict[int, list[tuple[int, int]]]) -> tuple[list, list]:
    """Split fill pieces (pid, vaddr, offset, length) at the edges of ranges (pid -> its
    [start, end) ranges): (those outside every range, those inside one)."""
    early, late = [], []
    for piece in pieces:
        pid, vaddr, off, length = piece
        spans = ranges.get(pid)
        if not spans:
            early.append(piece)
            continue
        pos, end = vaddr, vaddr + length
        for r_start, r_end in spans:
            if r_end <= pos or r_start >= end:
                continue
            if r_start > pos:
                early.append((pid, pos, off + pos - vaddr, r_start - pos))
                pos = r_start
            cut = min(end, r_end)
            late.append((pid, pos, off + pos - vaddr, cut - pos))
            pos = cut
            if pos >= end:
                break
        if pos < end:
            early.append((pid, pos, off + pos - vaddr, end - pos))
    return early, late


def split_items(items: list[tuple], ranges: dict[int, list[tuple[int, int]]]) -> tuple[list, list]:
    """The fill's items (chunk id, size, pieces) as (early, late): a chunk whose pieces
    fall on both sides is in both lists, each with its own pieces; late items keep their
    order (the pages images' order: ascending addresses of each pid)."""
    if not ranges:
        return list(items), []
    ordered = {pid: sorted(spans) for pid, spans in ranges.items()}
    early, late = [], []
    for cid, n, pieces in items:
        e, l_ = late_pieces(pieces, ordered)
        if e:
            early.append((cid, n, e))
        if l_:
            late.append((cid, n, l_))
    return early, late


def contains(ranges: dict[int, list[tuple[int, int]]], pid: int, start: int, end: int) -> bool:
    """Whether [start, end) of pid meets one of ranges."""
    return any(s < end and start < e for s, e in ranges.get(pid, ()))
