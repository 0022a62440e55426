"""CRIU's network lock, chosen for the host: while CRIU dumps or restores a tree's
established TCP connections it keeps packets off them with iptables (its default, the
iptables-restore program) or nftables. On a host with neither (the GPU machines: a
two-rank NCCL job holds its TCPStore's and NCCL's bootstrap connections) CRIU fails on
the first connection ("Iptables configuration failed"), after the CUDA state was locked
and checkpointed.

    iptables-restore on PATH       CRIU's default (no option)
    else nft on PATH               --network-lock nftables
    else                           --network-lock skip, where every established
                                   connection of the tree has its other end in the tree
                                   (both ends frozen while CRIU works, so no packet
                                   moves); a tree talking to the outside is refused
                                   before anything is touched

A restore uses what this host has, skip where it has neither (a snapshot with a
connection to the outside was refused at dump time on such a host).
"""

from __future__ import annotations

import shutil

from ..errors import CriuFailed

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
