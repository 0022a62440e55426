"""Connections in TIME_WAIT that would stop CRIU from binding a restored socket's port.

A tree dumped moments ago on this host leaves connections in TIME_WAIT on its
listeners' ports for 60 s (the kernel's TCP_TIMEWAIT_LEN): NCCL's bootstrap accepts
connections on its listening sockets and closes them, so a TP=2 server always has some.
CRIU binds those listeners again with SO_REUSEADDR and SO_REUSEPORT, which a TIME_WAIT
entry whose socket had neither still refuses: the restore fails ("Can't bind inet
socket: Address already in use") until they expire.

Before CRIU restores, for the ports its images bind (imagefile/inetsk.py):

    TIME_WAIT entries on them     /proc/self/net/tcp and tcp6 (this network namespace)
    -> SOCK_DESTROY each          NETLINK_SOCK_DIAG, the kernel's tcp_abort(): what
                                  `ss -K` does (CONFIG_INET_DIAG_DESTROY, CAP_NET_ADMIN)
    -> any left                   a kernel without it: wait for them to expire, at most
                                  WAIT_MAX seconds

Only TIME_WAIT entries are touched: one carries no data and has no owner. A live socket
on the port is left alone (CRIU then names the bind that failed).
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
import time
from dataclasses import dataclass

TCP_TIME_WAIT = 6
WAIT_MAX = 65.0             # TCP_TIMEWAIT_LEN (60 s) and some slack
NETLINK_SOCK_DIAG = 4
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
# struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states;
#   struct inet_diag_sockid { be16 sport, dport; be32 src[4], dst[4]; u32 if; u32 cookie[2]; } }
_REQ_HEAD = struct.Struct("=BBBBI")
_PORTS = struct.Struct(">HH")
_REQ_TAIL = struct.Struct("=III")
_NO_COOKIE = 0xFFFFFFFF
_TABLES = (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6))


@dataclass(frozen=True)
class Entry:
    """One connection of the kernel's TCP table: addresses as the kernel holds them
    (network order, 16 bytes; an IPv4 address in the first 4)."""
    family: int
    local: bytes
    lport: int
    remote: bytes
    rport: int


def _address(hexed: str) -> bytes:
    """/proc/net/tcp's address: 32-bit words, each printed as a host-order number."""
    if len(hexed) not in (8, 32):
        raise ValueError(f"{hexed!r} is not an address")
    words = [int(hexed[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hexed), 8)]
    return b"".join(words).ljust(16, b"\0")


def parse(text: str, family: int) -> list[tuple[int, Entry]]:
    """(state, entry) for each line of /proc/net/tcp or tcp6. Pure."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        (lh, lp), (rh, rp) = fields[1].split(":"), fields[2].split(":")
        out.append((int(fields[3], 16),
                    Entry(family, _address(lh), int(lp, 16), _address(rh), int(rp, 16))))
    return out


def time_wait(ports: set[int], net: str = "/proc/self/net") -> list[Entry]:
    """The connections in TIME_WAIT whose local port is one of ports."""
    found = []
    for name, family in _TABLES:
        try:
            with open(f"{net}/{name}") as f:
                text = f.read()
        except FileNotFoundError:           # no IPv6 in this kernel
            continue
        found += [e for state, e in parse(text, family) if state == TCP_TIME_WAIT and e.lport in ports]
    return found


def destroy_request(entry: Entry, seq: int = 1) -> bytes:
    """The SOCK_DESTROY message for one connection. Pure."""
    body = (_REQ_HEAD.pack(entry.family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_TIME_WAIT)
            + _PORTS.pack(entry.lport, entry.rport) + entry.local + entry.remote
            + _REQ_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE))
    return _NLMSG.pack(_NLMSG.size + len(body), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def destroy(entry: Entry) -> bool:
    """Drop one TIME_WAIT connection; False where this kernel or this user can't."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except OSError:
        return False
    with sock:
        sock.settimeout(2.0)
        try:
            sock.sendto(destroy_request(entry), (0, 0))
            reply = sock.recv(4096)
        except OSError:
            return False
    if len(reply) < _NLMSG.size + 4 or _NLMSG.unpack_from(reply)[1] != NLMSG_ERROR:
        return False
    (err,) = struct.unpack_from("=i", reply, _NLMSG.size)
    return err == 0 or -err == errno.ENOENT         # ENOENT: it expired meanwhile


def make_room(ports: set[int], wait_max: float = WAIT_MAX, net: str = "/proc/self/net",
              drop=destroy, clock=time.monotonic, sleep=time.sleep) -> str | None:
    """No TIME_WAIT connection left on ports (dropped, else waited for up to wait_max
    seconds); a note of what was done, None when there was nothing to do."""
    found = time_wait(ports, net) if ports else []
    if not found:
        return None
    where = ", ".join(str(p) for p in sorted({e.lport for e in found}))
    dropped = sum(bool(drop(entry)) for entry in found)
    started = clock()
    left = time_wait(ports, net)
    while left and clock() - started < wait_max:
        sleep(0.25)
        left = time_wait(ports, net)
    if not left and dropped == len(found):
        return (f"dropped {dropped} connection(s) in TIME_WAIT on port(s) {where}: "
                f"the restored tree listens there again")
    said = (f"{len(found) - dropped} connection(s) in TIME_WAIT on port(s) {where} (this "
            f"kernel could not drop them: CONFIG_INET_DIAG_DESTROY, CAP_NET_ADMIN)")
    if left:
        return f"{said} were still there after {clock() - started:.0f} s: CRIU's bind may fail"
    return f"waited {clock() - started:.1f} s for {said} to expire"
