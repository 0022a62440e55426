"""Warm image caches: a snapshot's CRIU images kept materialised, so that restores on
this host skip decompressing and verifying them.

    <workdir base>/cache/<store>/<snapshot id>/images/...  the images, verified when written
    <workdir base>/cache/<store>/<snapshot id>/digest       sha256 of the manifest's file list

(<store>: 16 hex digits of the sha256 of the store's path: stores never share caches, so
one store's gc cannot drop another's.)

`gpusnap warm SNAP` builds one (in a temp dir, renamed into place when complete), restore
uses it when its digest matches the manifest, `gpusnap rm` and `gpusnap gc` drop the
caches of snapshots that are gone, `gpusnap warm --drop` any. CRIU restore only reads
images (its log and pidfile go to the restore's own work dir), so one cache serves many
restores. A cache is trusted as the store is: owner-only (0700), written only by gpusnap
from verified chunks. It costs its size in memory on tmpfs (GPUSNAP_WORKDIR moves it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from ..model import Manifest
from ..store import Repository
from . import workdir


def root(store_path: str) -> str:
    store_key = hashlib.sha256(os.path.abspath(store_path).encode()).hexdigest()[:16]
    return os.path.join(workdir.private_base(store_path), "cache", store_key)


def digest(manifest: Manifest) -> str:
    files = [entry.to_json() for entry in manifest.files]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def lookup(store_path: str, manifest: Manifest) -> str | None:
    """The images dir of a complete cache of this snapshot, else None."""
    base = os.path.join(root(store_path), manifest.id)
    try:
        with open(os.path.join(base, "digest")) as f:
            if f.read().strip() != digest(manifest):
                return None
    except OSError:
        return None
    return os.path.join(base, "images")


def warm(repo: Repository, manifest: Manifest, progress=None) -> str:
    """Materialise the snapshot's images (verified) into its cache; the images dir."""
    found = lookup(repo.path, manifest)
    if found:
        return found
    cache_root = root(repo.path)
    os.makedirs(cache_root, mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(cache_root), 0o700)
    os.chmod(cache_root, 0o700)
    tmp = workdir.make(repo.path, "warm-")
    try:
        with repo.shared_lock():
            repo.materialise(manifest, os.path.join(tmp, "images"), progress)
        with open(os.path.join(tmp, "digest"), "w") as f:
            f.write(digest(manifest))
        final = os.path.join(cache_root, manifest.id)
        # Replacing a cache that a restore may be reading waits for the exclusive lock;
        # a concurrent warm that finished first wins (ours is thrown away).
        with repo.exclusive_lock():
            found = lookup(repo.path, manifest)
            if found:
                return found
            shutil.rmtree(final, ignore_errors=True)      # a stale one (digest changed)
            os.rename(tmp, final)
            tmp = None
        return os.path.join(final, "images")
    finally:
        workdir.remove(tmp)


def drop(store_path: str, snap_ids: list[str] | None = None, *, keep: set[str] | None = None) -> list[str]:
    """Remove the caches of snap_ids (all when None), except those in keep."""
    base = root(store_path)
    try:
        present = os.listdir(base)
    except FileNotFoundError:
        return []
    dropped = []
    for sid in present:
        if (snap_ids is None or sid in snap_ids) and sid not in (keep or set()):
            shutil.rmtree(os.path.join(base, sid), ignore_errors=True)
            dropped.append(sid)
    return dropped
