"""Scratch directories for CRIU images: on tmpfs where there is one, private to us."""

from __future__ import annotations

import os
import shutil
import tempfile


def base_dir(store_path: str) -> str:
    explicit = os.environ.get("GPUSNAP_WORKDIR")
    if explicit:
        return explicit
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm/gpusnap"
    return os.path.join(store_path, "tmp")


def make(store_path: str, prefix: str) -> str:
    base = base_dir(store_path)
    os.makedirs(base, mode=0o700, exist_ok=True)
    os.chmod(base, 0o700)
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def remove(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
