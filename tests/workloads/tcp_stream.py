"""Two processes (a parent and its child) stream numbered blocks to each other over one
loopback TCP connection and check each block they receive: a connection that lost or
misplaced data after a round trip says so, one that stalled stops counting.

    python -m tests.workloads.tcp_stream --dir D [--burst]

--burst: 16 blocks of 256 KiB, then 50 ms idle (as a collective between steps); else
without a pause, to receivers that read 64 KiB every 10 ms (the windows stay full:
whenever the tree is stopped, each sender holds data its peer has no room for). D/pid holds the parent's pid once
both run; D/status-parent.json and D/status-child.json (blocks received, ok: every
block in order and whole) are rewritten every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import threading
import time

BLOCK = 256 * 1024
PAD = bytes(range(256)) * ((BLOCK - 32) // 256) + bytes(range((BLOCK - 32) % 256))


def _receive(sock: socket.socket, got: dict, slow: bool) -> None:
    buf, n = b"", 0
    while True:
        if slow:
            time.sleep(0.01)
        data = sock.recv(64 << 10 if slow else 1 << 20)
        if not data:
            return
        buf += data
        while len(buf) >= BLOCK:
            block, buf = buf[:BLOCK], buf[BLOCK:]
            seq = struct.unpack("<Q", block[:8])[0]
            if seq != n or block[8:16] != block[-8:] or block[16:-16] != PAD:
                got["ok"] = False
            n += 1
            got["blocks"] = n


def _report(path: str, got: dict) -> None:
    while True:
        with open(path + ".tmp", "w") as f:
            json.dump(got, f)
        os.replace(path + ".tmp", path)
        time.sleep(0.05)


def _stream(sock: socket.socket, who: str, d: str, burst: bool) -> None:
    got = {"blocks": 0, "ok": True}
    threading.Thread(target=_receive, args=(sock, got, not burst), daemon=True).start()
    threading.Thread(target=_report, args=(os.path.join(d, f"status-{who}.json"), got),
                     daemon=True).start()
    n = 0
    while True:
        tag = struct.pack("<Q", n)
        sock.sendall(tag + tag + PAD + tag + tag)
        n += 1
        if burst and n % 16 == 0:
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--burst", action="store_true")
    a = ap.parse_args()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    if os.fork() == 0:
        listener.close()
        _stream(socket.create_connection(("127.0.0.1", port)), "child", a.dir, a.burst)
    conn, _ = listener.accept()
    listener.close()
    with open(os.path.join(a.dir, "pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(a.dir, "pid.tmp"), os.path.join(a.dir, "pid"))
    _stream(conn, "parent", a.dir, a.burst)


if __name__ == "__main__":
    main()
