"""Copy snapshots between two stores (local or remote), sending only missing chunks.

Both stores must encode chunks alike (both plain, or both encrypted with the same key):
chunk files and sealed manifests then move unchanged, and the key never leaves the node.
Every chunk is decoded and checked against its id on the way (a corrupt source chunk
stops the copy before the destination names it), the chunks are made durable, and the
manifest is written last, as a dump writes it. The caller holds both stores' shared locks.
"""

from __future__ import annotations

from ..errors import ArchiveError, IntegrityError, SnapshotNotFound, StoreError
from . import parallel
from .repository import Repository


def check_compatible(src: Repository, dst: Repository) -> None:
    if src.codec.describe() != dst.codec.describe():
        raise StoreError(f"{src.url} and {dst.url} encode chunks differently (plain vs "
                         "encrypted, or another key)",
                         hint="copy between stores of the same kind; to move a snapshot between "
                              "a plain and an encrypted store, restore it and dump it again")


def copy_snapshot(src: Repository, dst: Repository, snap_id: str, progress=None) -> dict:
    """Copy one snapshot; {id, chunks_copied, chunks_present, bytes_copied, already_present}."""
    sealed = src.manifest_blob(snap_id)
    manifest = src.load(snap_id)
    try:
        present = dst.manifest_blob(snap_id)
    except SnapshotNotFound:
        present = None
    if present == sealed:
        return {"id": snap_id, "chunks_copied": 0, "chunks_present": 0, "bytes_copied": 0,
                "already_present": True}
    if present is not None:
        raise ArchiveError(f"{dst.url} holds another snapshot with id {snap_id}")
    sizes = Repository.chunk_sizes(manifest)
    dst.backend.refresh("chunks/")
    missing = sorted(cid for cid in sizes if not dst.has_chunk(cid))
    copied = 0
    for batch in parallel.batches(missing, lambda cid: sizes[cid]):
        items = []
        for cid, blob in zip(batch, src.read_blobs(batch)):
            _plain, blob = src.decode_chunk(blob, cid, sizes[cid])     # IntegrityError if bad
            items.append((Repository.chunk_name(cid), blob))
            copied += len(blob)
        dst.backend.put_many(items)
        if progress:
            progress(sum(sizes[c] for c in batch))
    dst.backend.refresh("chunks/")
    lost = dst.missing_chunks(sizes)
    if lost:
        raise IntegrityError(f"{len(lost)} chunks vanished from {dst.url} before the manifest "
                             "was written (concurrent gc?)")
    dst.backend.sync(Repository.chunk_name(cid) for cid in sizes)
    dst.backend.put(f"snapshots/{snap_id}.json", sealed)
    return {"id": snap_id, "chunks_copied": len(missing), "chunks_present": len(sizes) - len(missing),
            "bytes_copied": copied, "already_present": False}
