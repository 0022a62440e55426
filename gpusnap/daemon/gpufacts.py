"""GPU facts for the restores gpusnapd runs, from a helper process that keeps NVML open.

A restore plans where its CUDA state goes with this host's GPUs (engine/gpu.plan_remap:
NVML's list, free memory included); started afresh each time, NVML's start is most of
what that costs. NVML must not be started in the daemon itself: a child forked from a
process that started it inherits state it cannot use (and CUDA's rules on fork come
with it). So the daemon forks this helper at start, before anything else: the helper
starts NVML once, and answers each line on its socket with one JSON line, the GPUs as
cuda/discover.GpuInfo dicts (null where NVML is missing or fails). Before it forks a
restore, the daemon asks (one request at a time, a deadline of a second); the child
plans with the answer (engine/gpu.use_host_gpus). No answer: the child asks NVML itself,
as the CLI does. The helper dies with the daemon (PR_SET_PDEATHSIG) or when its socket
closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket

from .. import sysrun

log = logging.getLogger("gpusnapd")


class GpuFacts:
    def __init__(self):
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.nvml: bool | None = None           # whether the last answer had GPUs
        self._lock: asyncio.Lock | None = None

    def start(self) -> None:
        """Fork the helper: call before any thread runs and before any NVML or CUDA use."""
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:                            # pragma: no cover - runs in the helper
            code = 0
            try:
                ours.close()
                _helper(theirs)
            except BaseException:  # noqa: BLE001 - the daemon sees the socket close
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        self.sock, self.pid = ours, pid

    async def ask(self, timeout: float = 1.0) -> list[dict] | None:
        """This host's GPUs, or None (no NVML, no helper, no answer in time)."""
        if self.sock is None:
            return None
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            try:
                line = await asyncio.wait_for(self._round_trip(), timeout)
                gpus = parse(line)
            except (asyncio.TimeoutError, OSError, ValueError) as exc:
                log.info("gpu facts helper gone", extra={"fields": {"error": repr(exc)}})
                self.stop()
                return None
        self.nvml = gpus is not None
        return gpus

    async def _round_trip(self) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, b"?\n")
        data = b""
        while not data.endswith(b"\n"):
            more = await loop.sock_recv(self.sock, 1 << 16)
            if not more:
                raise OSError("the helper closed its socket")
            data += more
        return data

    def describe(self) -> dict:
        return {"pid": self.pid, "nvml": self.nvml}

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pid is not None:
            sysrun.kill_child(self.pid)
            self.pid = None


def parse(line: bytes) -> list[dict] | None:
    """The helper's answer: GpuInfo dicts, or None; ValueError if it is neither."""
    from ..cuda.discover import GpuInfo
    data = json.loads(line)
    if data is None:
        return None
    if not isinstance(data, list):
        raise ValueError("not a list of GPUs")
    try:
        return [GpuInfo(**g).to_dict() for g in data]
    except TypeError as exc:
        raise ValueError(f"not a GPU: {exc}") from None


def _helper(sock: socket.socket) -> None:  # pragma: no cover - runs in the helper
    sysrun.die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from .ops import close_fds_except
    close_fds_except({0, 1, 2, sock.fileno()})   # the daemon's lock, log and sockets
    try:
        import pynvml
        pynvml.nvmlInit()                       # held for the helper's life
        nv = True
    except Exception:  # noqa: BLE001 - no NVML here: every answer is null
        nv = False
    with sock.makefile("rwb", buffering=0) as f:
        for _ in f:
            f.write(json.dumps(_gpus() if nv else None).encode() + b"\n")


def _gpus() -> list[dict] | None:               # pragma: no cover - runs in the helper
    from ..cuda import discover
    try:
        return [g.to_dict() for g in discover.host_gpus().gpus]
    except Exception:  # noqa: BLE001 - the restore asks NVML itself, and says what fails
        return None
