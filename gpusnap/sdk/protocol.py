"""The agent protocol: where an agent listens, and the client side. Stdlib only.

An agent listens on a unix stream socket DIR/agent-<pid>.sock (DIR is /run/gpusnap unless
the server chose another; created 0700, the socket 0600). A client connects, sends one
JSON object and shuts its writing side down (or ends the object with a newline), and
reads one JSON object back; the agent then closes the connection. Only root and the
server's own uid may talk to it (SO_PEERCRED).

    REQUEST ::= {"cmd": "status" | "prepare" | "resume", "version": 1}
    REPLY   ::= {"ok": true, "state": ..., ...} | {"ok": false, "error": str, "state": ...}

status   -> state ("resident" | "prepared"), pid, uid, tensors, bytes, files, reader
prepare  -> the registered tensors are dropped from GPU memory (idempotent);
            bytes_freed, bytes_released, files (identity of each weight file), seconds
resume   -> the tensors are allocated again and read from their files (idempotent);
            bytes, seconds, gbps, reader, verified

The client waits for EOF before returning, so when request() returns the agent has
closed its end: nothing of the connection is left for CRIU to dump.

The agent checks its peer (SO_PEERCRED) before it reads anything, and answers a
stranger without reading. A client that expects a given agent (gpusnap, as root) checks
its peer too, before it sends anything: the socket file must be a socket, not a
symlink (it is opened O_PATH|O_NOFOLLOW and connected to through /proc/self/fd, so
the inode checked is the one connected to), and the listening process must be one of
the pids it expects, running as the uid it expects. A target that swaps its socket for
a link to another server's agent gets nothing sent anywhere.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import time
from typing import Collection

VERSION = 1
DEFAULT_DIR = "/run/gpusnap"
MAX_MESSAGE = 16 << 20


class AgentError(Exception):
    """The agent could not be reached, timed out, or answered ok: false."""

    def __init__(self, message: str, reply: dict | None = None):
        super().__init__(message)
        self.reply = reply


def agent_dir() -> str:
    return os.environ.get("GPUSNAP_AGENT_DIR") or DEFAULT_DIR


def socket_path(pid: int, directory: str | None = None) -> str:
    return os.path.join(directory or agent_dir(), f"agent-{pid}.sock")


def recv_message(conn: socket.socket, deadline: float | None = None) -> bytes:
    """Read until EOF or a newline (at most MAX_MESSAGE)."""
    buf = bytearray()
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            conn.settimeout(left)
        b = conn.recv(1 << 16)
        if not b:
            break
        buf += b
        if b"\n" in b:
            break
        if len(buf) > MAX_MESSAGE:
            raise ValueError("message too long")
    return bytes(buf)


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _connect_nofollow(s: socket.socket, path: str) -> None:
    """connect() to the socket inode at path itself: a symlink there is refused."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISSOCK(mode):
            raise AgentError(f"agent at {path}: not a socket"
                             + (" (a symbolic link: not followed)" if stat.S_ISLNK(mode) else ""))
        s.connect(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _check_peer(s: socket.socket, path: str, pids: Collection[int] | None, uid: int | None) -> None:
    pid, peer_uid = peer_credentials(s)
    if pids is not None and pid not in pids:
        raise AgentError(f"agent at {path}: listened to by pid {pid}, not by the process it "
                         f"belongs to: nothing sent")
    if uid is not None and peer_uid != uid:
        raise AgentError(f"agent at {path}: runs as uid {peer_uid}, not {uid}: nothing sent")


def request(path: str, cmd: str, timeout: float = 30.0, *, pids: Collection[int] | None = None,
            uid: int | None = None, **args) -> dict:
    """Send one command, return the reply (ok: true), or raise AgentError.

    A symlink at path is never followed. pids/uid: the agent must be listened to by one
    of pids, as uid, else nothing is sent."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            _connect_nofollow(s, path)
            _check_peer(s, path, pids, uid)
            s.sendall(json.dumps({"cmd": cmd, "version": VERSION, **args}).encode() + b"\n")
            s.shutdown(socket.SHUT_WR)
            raw = recv_message(s, deadline)
            # wait for the agent's close: nothing of this connection outlives the call
            while s.recv(1 << 16):
                pass
    except (TimeoutError, socket.timeout):
        raise AgentError(f"agent at {path}: no answer to {cmd!r} within {timeout:g} s") from None
    except OSError as e:
        raise AgentError(f"agent at {path}: {e.strerror or e}") from None
    try:
        reply = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise AgentError(f"agent at {path}: answer to {cmd!r} is not JSON") from None
    if not isinstance(reply, dict):
        raise AgentError(f"agent at {path}: answer to {cmd!r} is not a JSON object")
    if not reply.get("ok"):
        raise AgentError(f"agent at {path}: {cmd} failed: {reply.get('error', 'no reason given')}", reply)
    return reply
