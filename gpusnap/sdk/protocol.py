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
"""

from __future__ import annotations

import json
import os
import socket
import time

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


def request(path: str, cmd: str, timeout: float = 30.0, **args) -> dict:
    """Send one command, return the reply (ok: true), or raise AgentError."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
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
