"""CRIU's network lock, chosen for the host: while CRIU dumps or restores a tree's
established TCP connections it keeps packets off them with iptables (its default, the
iptables-restore program) or nftables. On a host with neither (the GPU machines: a
two-rank NCCL job holds its TCPStore's and NCCL's bootstrap connections) CRIU fails on
the first connection ("Iptables configuration failed"), after the CUDA state was locked
and checkpointed.

    iptables-restore on PATH       CRIU's default (no option)
    else nft on PATH               --network-lock nftables
    else                           --network-lock skip, where every established
                                   connection of the tree has its other end in the tree;
                                   a tree talking to the outside is refused before
                                   anything is touched

Skipping the lock is not enough by itself: frozen tasks send nothing, but their kernels
do (data queued before the freeze goes out as the peer ACKs it), and CRIU reads one
end's queues before the other's. Data that moves in between is in neither image, or is
ACKed in one and missing from the other: the restored connection stalls for good (a
loopback stream dumped this way hung on the first restore). So before such a dump
gpusnap stops the tree with SIGSTOP and waits until its connections settle (quiesce():
nothing sent is unACKed, and the queues hold still), CRIU records the tasks stopped, and
the restore continues them (the manifest's criu.stopped).

A restore uses what this host has, skip where it has neither (a snapshot with a
connection to the outside was refused at dump time on such a host).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass

from ..errors import CriuFailed
from ..targets import fds
from ..targets.process import send

Endpoint = tuple[str, int]


def lock_tool(which=shutil.which) -> str | None:
    """'iptables', 'nftables' or None: what CRIU can lock the network with here."""
    if which("iptables-restore"):
        return "iptables"
    if which("nft"):
        return "nftables"
    return None


def outside(connections: list[tuple[Endpoint, Endpoint]]) -> list[tuple[Endpoint, Endpoint]]:
    """The (local, remote) pairs whose other end is not among connections. Pure."""
    ends = set(connections)
    return [(local, remote) for local, remote in connections if (remote, local) not in ends]


def choose(tool: str | None, connections: list[tuple[Endpoint, Endpoint]], pids: list[int]) -> str | None:
    """The --network-lock method for a dump (None: CRIU's default), or CriuFailed when
    CRIU could not lock these connections here. Pure."""
    if tool == "iptables":
        return None
    if tool == "nftables":
        return "nftables"
    away = outside(connections)
    if away:
        shown = ", ".join(f"{a[0]}:{a[1]} -> {b[0]}:{b[1]}" for a, b in away[:4])
        raise CriuFailed(
            f"pids {pids} hold TCP connections to peers outside the tree ({shown}) and this "
            f"host has neither iptables-restore nor nft, which CRIU locks them with while it "
            f"dumps; refused before anything was touched",
            hint="install iptables (or nftables), or close those connections before the dump")
    return "skip" if connections else None


def established(pids: list[int]) -> list[tuple[Endpoint, Endpoint]]:
    """(local, remote) of every established TCP connection the pids hold (psutil)."""
    import psutil
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") \
                else proc.connections("tcp")
        except (psutil.Error, OSError):
            continue
        out += [((c.laddr.ip, c.laddr.port), (c.raddr.ip, c.raddr.port)) for c in conns
                if c.status == psutil.CONN_ESTABLISHED and c.raddr]
    return out


def for_dump(pids: list[int]) -> str | None:
    """choose() over this host and the tree's connections."""
    tool = lock_tool()
    return choose(tool, [] if tool else established(pids), pids)


def for_restore() -> str | None:
    """The method for a restore here (None: CRIU's default)."""
    return {"iptables": None, "nftables": "nftables"}.get(lock_tool(), "skip")


# ---- settling the connections before a dump without a lock -----------------------------

ESTABLISHED = "01"
RETRANSMIT_TIMER = 1            # /proc/net/tcp's tr: data sent and not yet ACKed


@dataclass(frozen=True)
class Queue:
    """One socket's line of /proc/net/tcp{,6}: state, bytes in its send and receive
    queues, and which timer runs."""
    state: str
    tx: int
    rx: int
    timer: int


def queues(text: str, inodes: set[int]) -> dict[int, Queue]:
    """The lines of /proc/net/tcp (or tcp6) for the sockets in inodes, by inode. Pure."""
    out = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10 or ":" not in f[4] or ":" not in f[5]:
            continue
        try:
            inode = int(f[9])
            tx, rx = (int(x, 16) for x in f[4].split(":"))
            timer = int(f[5].split(":")[0], 16)
        except ValueError:
            continue
        if inode in inodes:
            out[inode] = Queue(f[3], tx, rx, timer)
    return out


def settled(before: dict[int, Queue], now: dict[int, Queue]) -> bool:
    """Nothing an established connection sent waits for its ACK, and no queue moved
    since the last look. Pure."""
    return now == before and not any(q.state == ESTABLISHED and q.timer == RETRANSMIT_TIMER
                                     for q in now.values())


def _read_queues(pid: int, inodes: set[int]) -> dict[int, Queue]:
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                out.update(queues(f.read(), inodes))
        except OSError:
            pass
    return out


def _stopped(pid: int) -> bool:
    fields = fds.stat_fields(pid)
    return not fields or fields[0] in ("T", "t")     # gone: nothing of it moves


def quiesce(pids: list[int], already_stopped: set[int], into: list[int], tries: int = 6,
            timeout: float = 5.0, step: float = 0.005) -> str:
    """SIGSTOP the pids not stopped already, wait for them to stop and for their TCP
    connections to settle (settled(), twice in a row). A connection that settles with
    data its peer has no room for (a full window) cannot be restored without a lock
    (CRIU sends such data on restore, before the peer's socket exists: EPIPE), so the
    tree is continued and tried again a moment later. The pids it stops go into `into`
    before they are stopped (their undo is SIGCONT). CriuFailed, with them stopped, if
    the connections do not settle, or after `tries` full windows. Returns a note for the
    snapshot: how long the last try took to settle, and how many tries."""
    for attempt in range(tries):
        if attempt:
            send(into, signal.SIGCONT)
            into.clear()
            time.sleep(0.05 * attempt)
        for pid in pids:
            if pid in already_stopped or pid in into:
                continue
            into.append(pid)
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                into.remove(pid)
        t0 = time.monotonic()
        now = _settle(pids, into, timeout, step)
        full = sorted(i for i, q in now.items() if q.state == ESTABLISHED and q.tx)
        if not full:
            return (f"no network lock on this host: the tree was stopped before CRIU and its "
                    f"{len(now)} TCP sockets settled in {(time.monotonic() - t0) * 1000:.0f} ms"
                    + (f" (try {attempt + 1}: full windows before)" if attempt else ""))
    raise CriuFailed(
        f"pids {pids}: TCP connections of the tree hold data their peer had no room for "
        f"(sockets {full[:4]}), at each of {tries} tries; with no network lock on this host "
        f"CRIU cannot restore such a connection", hint="install iptables (or nftables), "
        "which CRIU locks connections with, or dump when the tree's connections are idle")


def _settle(pids: list[int], stopped: list[int], timeout: float, step: float) -> dict[int, Queue]:
    """Once the stopped pids have stopped: the tree's queues when they held still."""
    deadline = time.monotonic() + timeout
    while not all(_stopped(p) for p in stopped):
        if time.monotonic() > deadline:
            raise CriuFailed(f"pids {stopped} did not stop within {timeout:g} s of SIGSTOP")
        time.sleep(step)
    inodes = fds.socket_inodes(pids)
    before, calm = None, 0
    while True:
        now = _read_queues(pids[0], inodes)
        calm = calm + 1 if before is not None and settled(before, now) else 0
        if calm >= 2:
            return now
        if time.monotonic() > deadline:
            busy = sorted(i for i, q in now.items() if q.timer == RETRANSMIT_TIMER)
            raise CriuFailed(
                f"the tree's TCP connections did not settle within {timeout:g} s of "
                f"stopping it (sockets {busy[:4]} wait for ACKs): with no network lock here "
                f"CRIU would dump them with data in flight",
                hint="install iptables (or nftables), which CRIU locks connections with")
        before = now
        time.sleep(step)
