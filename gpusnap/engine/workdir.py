"""Scratch directories for CRIU images: on tmpfs where there is one, private to us."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from ..errors import InsecureStore


def base_dir(store_path: str) -> str:
    explicit = os.environ.get("GPUSNAP_WORKDIR")
    if explicit:
        return explicit
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm/gpusnap"
    return os.path.join(store_path, "tmp")


def private_base(store_path: str) -> str:
    """base_dir(), created 0700 if missing, and refused unless it is a real directory of
    ours that nobody else can enter: /dev/shm is writable by everyone, and whoever owns
    this directory could swap the images a dump ingests or a restore hands to CRIU."""
    base = base_dir(store_path)
    os.makedirs(os.path.dirname(base) or "/", exist_ok=True)
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise InsecureStore(f"work directory {base} is not a private directory of uid {os.geteuid()}",
                            hint="remove it (gpusnap recreates it), or set GPUSNAP_WORKDIR "
                                 "to a directory only you can open")
    return base


def make(store_path: str, prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir=private_base(store_path))


def remove(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def keep_log(store_path: str, log: str, kind: str) -> str | None:
    """Copy a CRIU log out of a work dir (about to be removed) into the store's
    failed-logs/; None if that fails (the store is full, say): the error being reported
    matters more than its log."""
    dest_dir = os.path.join(store_path, "failed-logs")
    dest = os.path.join(dest_dir, f"{kind}-{os.getpid()}-{os.path.basename(os.path.dirname(os.path.dirname(log)))}.log")
    try:
        os.makedirs(dest_dir, mode=0o700, exist_ok=True)
        shutil.copyfile(log, dest)
        os.chmod(dest, 0o600)
        return dest
    except OSError:
        try:
            os.unlink(dest)
        except OSError:
            pass
        return None
