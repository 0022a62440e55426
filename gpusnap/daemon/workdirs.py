"""The daemon's own work directory, so that at start it can remove what its operations
left behind (a child killed with -9 cannot remove its CRIU images) without touching the
work dirs of a CLI running beside it.

    <work base>/gpusnapd-<socket key>/          GPUSNAP_WORKDIR of the daemon's operations
    <work base>/gpusnapd-<socket key>/.lock     flock held while the daemon runs
    <work base>/gpusnapd-<socket key>/cache  -> <work base>/cache   warm caches shared with the CLI

(<work base>: engine/workdir.base_dir, a huge-page tmpfs as root; <socket key>: 12 hex
digits of the sha256 of the socket's path.) The lock also keeps a second daemon off
the same socket.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil

from ..engine import workdir
from ..errors import GpusnapError


class DaemonWorkdir:
    def __init__(self, socket_path: str, store_path: str):
        self.socket_path = os.path.abspath(socket_path)
        self.store_path = store_path
        self.path = ""
        self.removed: list[str] = []
        self._lock_fd = -1
        self._old_env: str | None = None

    def __enter__(self) -> "DaemonWorkdir":
        base = workdir.private_base(self.store_path)
        key = hashlib.sha256(self.socket_path.encode()).hexdigest()[:12]
        self.path = os.path.join(base, f"gpusnapd-{key}")
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)
        self._lock_fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise GpusnapError(f"another gpusnapd serves {self.socket_path}") from None
        self.removed = self._remove_leftovers()
        cache = os.path.join(base, "cache")
        os.makedirs(cache, mode=0o700, exist_ok=True)
        link = os.path.join(self.path, "cache")
        if not os.path.islink(link):
            os.symlink(cache, link)
        self._old_env = os.environ.get("GPUSNAP_WORKDIR")
        os.environ["GPUSNAP_WORKDIR"] = self.path
        return self

    def _remove_leftovers(self) -> list[str]:
        removed = []
        for name in sorted(os.listdir(self.path)):
            if name in (".lock", "cache"):
                continue
            shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
            removed.append(name)
        return removed

    def leftovers(self) -> list[str]:
        return sorted(set(os.listdir(self.path)) - {".lock", "cache"})

    def __exit__(self, *exc) -> None:
        if self._old_env is None:
            os.environ.pop("GPUSNAP_WORKDIR", None)
        else:
            os.environ["GPUSNAP_WORKDIR"] = self._old_env
        os.close(self._lock_fd)
