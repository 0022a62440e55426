"""Warm image caches: a snapshot's CRIU images kept prepared on this host, so that
restores skip decompressing, verifying and planning them. One per page path:

    <base>/cache/<store>/<snapshot id>/criu/images/...  every image (restore --pages criu)
    <base>/cache/<store>/<snapshot id>/uffd/images/...  all but the lazy pages, pagemaps
                                                        marked PE_LAZY (--pages uffd)
    <base>/cache/<store>/<snapshot id>/uffd/plan.json   the fill's work (pagepath.Prepared)
    <base>/cache/<store>/<snapshot id>/<kind>/digest    sha256 of the layout version, the
                                                        kind and the manifest's file list

(<store>: 16 hex digits of the sha256 of the store's path: stores never share caches, so
one store's gc cannot drop another's.)

`gpusnap warm SNAP` (or gpusnapd's /v1/warm) builds one in a temp dir, renamed into place
when complete; a restore uses it when its digest matches the manifest (a plan.json that
does not parse is a miss: the restore prepares its own). `gpusnap rm` and `gpusnap gc`
drop the caches of snapshots that are gone, `gpusnap warm --drop` any. CRIU restore only
reads images (its log, pidfile and lazy-pages socket go to the restore's own work dir),
and a restore holds the store's shared lock while it reads them, so one cache serves many
restores and is replaced or dropped only under the exclusive lock. A cache is trusted as
the store is: owner-only (0700), written only by gpusnap from verified chunks. It costs
its size in memory on tmpfs (GPUSNAP_WORKDIR moves it); a uffd cache holds only what
CRIU reads itself, a small part of the snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from ..model import Manifest
from ..store import Repository
from . import workdir

KINDS = ("criu", "uffd")
LAYOUT = 2                      # a change to what a cache holds invalidates the old ones
PLAN = "plan.json"


def root(store_path: str) -> str:
    store_key = hashlib.sha256(os.path.abspath(store_path).encode()).hexdigest()[:16]
    return os.path.join(workdir.private_base(store_path), "cache", store_key)


def digest(manifest: Manifest, kind: str = "criu") -> str:
    files = [entry.to_json() for entry in manifest.files]
    return hashlib.sha256(json.dumps({"layout": LAYOUT, "kind": kind, "files": files},
                                     sort_keys=True).encode()).hexdigest()


def _complete(store_path: str, manifest: Manifest, kind: str) -> str | None:
    """The dir of a complete cache of this snapshot for kind, else None."""
    base = os.path.join(root(store_path), manifest.id, kind)
    try:
        with open(os.path.join(base, "digest")) as f:
            if f.read().strip() != digest(manifest, kind):
                return None
    except OSError:
        return None
    return base


def lookup(store_path: str, manifest: Manifest) -> str | None:
    """The images dir of a complete criu-path cache of this snapshot, else None."""
    found = _complete(store_path, manifest, "criu")
    return os.path.join(found, "images") if found else None


def lookup_prepared(store_path: str, manifest: Manifest):
    """The pagepath.Prepared of a complete uffd-path cache of this snapshot, else None."""
    found = _complete(store_path, manifest, "uffd")
    return _prepared(found) if found else None


def _prepared(found: str):
    from .pagepath import Prepared
    try:
        with open(os.path.join(found, PLAN)) as f:
            return Prepared.from_json(os.path.join(found, "images"), json.load(f))
    except (OSError, ValueError):
        return None


def _usable(store_path: str, manifest: Manifest, kind: str) -> str | None:
    """The dir of a cache a restore would use, else None."""
    found = _complete(store_path, manifest, kind)
    if found and kind == "uffd" and _prepared(found) is None:
        return None
    return found


def _build(repo: Repository, manifest: Manifest, kind: str, tmp: str, progress) -> None:
    images = os.path.join(tmp, "images")
    if kind == "criu":
        repo.materialise(manifest, images, progress)
        return
    from .pagepath import prepare
    prepared = prepare(repo, manifest, images, progress)
    with open(os.path.join(tmp, PLAN), "w") as f:
        json.dump(prepared.to_json(), f)


def warm(repo: Repository, manifest: Manifest, progress=None, kind: str = "criu") -> str:
    """Prepare the snapshot's images (verified) for kind's page path in its cache; the
    cache's images dir. A remote store's chunks of the snapshot come into the node's
    chunk cache as well (the uffd path's fill reads its pages from there)."""
    if kind not in KINDS:
        raise ValueError(f"no {kind!r} cache")
    found = _usable(repo.path, manifest, kind)
    if found:
        return os.path.join(found, "images")
    cache_root = root(repo.path)
    os.makedirs(cache_root, mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(cache_root), 0o700)
    os.chmod(cache_root, 0o700)
    tmp = workdir.make(repo.path, "warm-")
    try:
        with repo.shared_lock(), repo.prefetch(manifest, finish=True):
            _build(repo, manifest, kind, tmp, progress)
        with open(os.path.join(tmp, "digest"), "w") as f:
            f.write(digest(manifest, kind))
        final = os.path.join(cache_root, manifest.id, kind)
        # Replacing a cache that a restore may be reading waits for the exclusive lock;
        # a concurrent warm that finished first wins (ours is thrown away).
        with repo.exclusive_lock():
            found = _usable(repo.path, manifest, kind)
            if found:
                return os.path.join(found, "images")
            shutil.rmtree(final, ignore_errors=True)      # a stale one (digest changed)
            os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
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
