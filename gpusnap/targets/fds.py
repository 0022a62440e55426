"""Descriptors of a process tree that lead outside it, found before a dump.

A process restored from a snapshot gets its descriptors back, but not what was at their
other end: a pipe whose other end a process outside the tree held (its stdout piped into
a logger, say) comes back with nobody on the other side, and the restored process dies
on its next write or reads end-of-file. CRIU handles such descriptors only when told
(--inherit-fd, --external), as podman does for conmon's pipes; a plain dump should find
them first and say so.

    classify(tree, fds, holders, procs)   pure: the facts in, the findings out
    scan(tree)                            reads the facts from /proc, then classify()

What is found:
    pipe     a pipe (or FIFO) that a process outside the tree also holds
    socket   a socket that a process outside the tree also holds (shared, not its peer)
    tty      a terminal that no session leader of the tree has as its controlling tty
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_INODE = re.compile(r"^(pipe|socket):\[(\d+)\]$")


@dataclass(frozen=True)
class Fd:
    """One descriptor: its /proc/PID/fd link, and the device of a character device."""
    pid: int
    fd: int
    link: str
    rdev: int | None = None


@dataclass(frozen=True)
class Proc:
    """What /proc/PID/stat says about a process's session and controlling tty."""
    pid: int
    session: int
    tty_nr: int


@dataclass(frozen=True)
class OutsideFd:
    pid: int
    fd: int
    kind: str                       # pipe | socket | tty
    what: str                       # the link: pipe:[123], /dev/pts/4
    holders: tuple[int, ...] = ()   # processes outside the tree that hold it too

    def describe(self) -> str:
        name = {0: "stdin", 1: "stdout", 2: "stderr"}.get(self.fd, f"fd {self.fd}")
        if self.kind == "tty":
            return f"pid {self.pid} {name} is {self.what}, a terminal the tree does not own"
        return (f"pid {self.pid} {name} is {self.what}, also held by pid "
                f"{', '.join(map(str, self.holders))} outside the tree")

    def restored(self) -> str:
        """What a restore makes of it (CRIU restores the tree's end only)."""
        return {"pipe": "a pipe with nobody at the other end (a write fails: SIGPIPE, or "
                        "EPIPE where that is ignored; a read sees end of file)",
                "socket": "a socket of the tree alone (the processes outside no longer "
                          "share it)",
                "tty": "nothing: CRIU dumps a terminal only with its master side (held "
                       "outside), or a shell job's by inheriting one at restore, which "
                       "gpusnap restore has none to give (the dump or the restore fails)"}[self.kind]


def is_tty(link: str) -> bool:
    return link.startswith("/dev/pts/") or re.match(r"^/dev/tty\w*$", link) is not None


def classify(tree: list[int], fds: list[Fd], holders: dict[str, set[int]],
             procs: dict[int, Proc]) -> list[OutsideFd]:
    """The descriptors of the tree that lead outside it.

    holders: link (pipe:[N], socket:[N]) -> every pid that holds it, tree or not.
    procs: the tree's processes."""
    inside = set(tree)
    owned_ttys = {p.tty_nr for p in procs.values() if p.pid == p.session and p.tty_nr}
    out = []
    for f in fds:
        m = _INODE.match(f.link)
        if m:
            outside = sorted(holders.get(f.link, set()) - inside)
            if outside:
                out.append(OutsideFd(f.pid, f.fd, m.group(1), f.link, tuple(outside)))
        elif is_tty(f.link) and f.rdev not in owned_ttys:
            out.append(OutsideFd(f.pid, f.fd, "tty", f.link))
    return out


def links(pid: int) -> dict[int, str]:
    """fd -> what /proc/PID/fd/FD links to; {} for a process that is gone or not ours."""
    base = f"/proc/{pid}/fd"
    out = {}
    try:
        names = os.listdir(base)
    except OSError:             # gone, or not ours to read
        return out
    for name in names:
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except OSError:
            continue
    return out


def socket_inodes(pids: list[int]) -> set[int]:
    """The inodes of the sockets the pids hold (socket:[N] links)."""
    return {int(link[8:-1]) for pid in pids for link in links(pid).values()
            if link.startswith("socket:[")}


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from its third field on (state), None if it is gone: fields[n] is
    field n + 3 of proc(5)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _proc(pid: int) -> Proc | None:
    fields = stat_fields(pid)
    return None if fields is None else Proc(pid, int(fields[3]), int(fields[4]))   # 6, 7


def _rdev(link: str) -> int | None:
    try:
        return os.stat(link).st_rdev
    except OSError:
        return None


def scan(tree: list[int]) -> list[OutsideFd]:
    """classify() over what /proc says now. Every process is looked at to find who else
    holds the tree's pipes and sockets."""
    fds = [Fd(pid, fd, link, _rdev(link) if is_tty(link) else None)
           for pid in tree for fd, link in sorted(links(pid).items())]
    wanted = {f.link for f in fds if _INODE.match(f.link)}
    holders: dict[str, set[int]] = {}
    if wanted:
        for name in os.listdir("/proc"):
            if name.isdigit():
                for link in links(int(name)).values():
                    if link in wanted:
                        holders.setdefault(link, set()).add(int(name))
    procs = {pid: p for pid in tree if (p := _proc(pid)) is not None}
    return classify(tree, fds, holders, procs)
