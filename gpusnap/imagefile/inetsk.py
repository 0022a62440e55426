"""CRIU's files image: the TCP ports a restore binds again with a plain bind().

    FILES_IMAGE ::= COMMON_MAGIC FILES_MAGIC { FILE_ENTRY }
    FILE_ENTRY  ::= file_entry { 1: type fd_types, 2: id u32, 4: isk INET_SK, ... }
    INET_SK     ::= inet_sk_entry { 3: family, 4: type, 5: proto, 6: state, 7: src_port,
                                    8: dst_port, ... }
    fd_types: INETSK = 4; proto: IPPROTO_TCP = 6

CRIU restores a TCP socket with a peer (dst_port set) in repair mode, where the kernel
lets it take its port whatever else holds it. A listening or bound-only socket (a
src_port, no dst_port) is bound the ordinary way, with SO_REUSEADDR and SO_REUSEPORT
set for the call (criu/sk-inet.c): a connection left in TIME_WAIT on that port by a
socket that had neither still makes that bind fail with EADDRINUSE. These are the
ports criu/timewait.py clears before CRIU restores. Pure: bytes in, facts out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from . import image
from .protobuf import decode_fields

FILES_MAGIC = 0x56303138
INETSK = 4
IPPROTO_TCP = 6
TCP_LISTEN = 10


@dataclass(frozen=True)
class BoundSocket:
    """A TCP socket CRIU binds with bind(): its port, address family and TCP state."""
    port: int
    family: int
    state: int

    @property
    def listening(self) -> bool:
        return self.state == TCP_LISTEN


def bound_tcp(f: BinaryIO) -> list[BoundSocket]:
    """The TCP sockets of a files image that CRIU binds without repair mode."""
    if image.read_magic(f) != FILES_MAGIC:
        raise ValueError("not a files image")
    found = []
    for payload in image.entries(f):
        entry = decode_fields(payload)
        isk = entry.get(4)
        if entry.get(1) != INETSK or not isinstance(isk, bytes):
            continue
        sk = decode_fields(isk)
        family, proto, state, port, peer = (sk.get(n, 0) for n in (3, 5, 6, 7, 8))
        if not all(type(v) is int for v in (family, proto, state, port, peer)):
            raise ValueError("an inet socket entry with a field of the wrong type")
        if proto == IPPROTO_TCP and port and not peer:
            if port >= 65536:
                raise ValueError(f"port {port} in a files image")
            found.append(BoundSocket(port, family, state))
    return found
