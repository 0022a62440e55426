"""The object interface every store backend implements.

Objects are named by slash-separated paths relative to the store: `config`,
`chunks/<xx>/<id>`, `snapshots/<id>.json`, `locks/<id>`. The contract, checked by
tests/unit/test_backends.py against every backend:

- put(name, data): the object appears whole or not at all (never a torn object under
  its name); a later put replaces it. Chunks are written once: their content is fixed
  by their name, so two writers racing on one name store equivalent bytes.
- put(..., if_absent=True): create only; False (nothing written) when it exists.
- put(..., durable=False), put_many: may not survive a crash until sync() of its name
  (that sync also covers a name another writer put, found by exists(): dedup).
- get(name) of a missing object raises Missing; list(prefix) yields (name, size) of
  every object whose name starts with prefix, each once, in no set order, and sees
  every put that returned before it started (S3 has been strongly consistent for
  read-after-write and list-after-write since 2020; so are MinIO, Ceph RGW and R2).
- delete(name) of a missing object raises Missing; delete_many ignores missing ones.
  A backend that packs chunks (s3) deletes a chunk with its pack, once no chunk of the
  pack is left (reclaim() says which go); gc deletes what reclaim() names.
- lock(exclusive, timeout): a context manager; shared holders exclude exclusive ones.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator


def chunk_name(cid: str) -> str:
    """The object name of chunk cid, in every backend: chunks/<first two hex digits>/<cid>."""
    return f"chunks/{cid[:2]}/{cid}"


class Missing(LookupError):
    """No object of that name."""


class Backend:
    url: str                    # how users name this store (a path or s3://...)
    batches_puts = False        # ingest hands new chunks over a batch at a time (put_many)

    def get(self, name: str) -> bytes:
        raise NotImplementedError

    def get_many(self, names: list[str]) -> Iterator[bytes]:
        """The objects' bytes, in the order of names (a backend may fetch ahead)."""
        for name in names:
            yield self.get(name)

    def put(self, name: str, data, *, durable: bool = True, if_absent: bool = False) -> bool:
        raise NotImplementedError

    def put_many(self, items: list[tuple[str, bytes]]) -> set[str]:
        """Non-durable puts of several objects (a backend may run them at once). Returns
        the names it found stored by another writer meanwhile and left (none here)."""
        for name, data in items:
            self.put(name, data, durable=False)
        return set()

    def claim(self, name: str, size: int) -> int | None:
        """For batched puts: None when this process is the first to send name, else the
        size the first claimant gave (so one ingest uploads and counts a chunk once)."""
        return None

    def size(self, name: str) -> int | None:
        """Stored size of the object, None when it does not exist."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def missing(self, names: Iterable[str]) -> list[str]:
        """The names that do not exist (remote backends: from the listing refresh() took)."""
        return [name for name in names if not self.exists(name)]

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def delete_many(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(Missing):
                self.delete(name)

    def reclaim(self, dead: dict[str, int]) -> tuple[list[str], list[str], int]:
        """For gc, of the chunks no snapshot needs (name -> stored size): the chunks that
        go, the objects to delete for that, and the bytes it frees. Here: every one."""
        return list(dead), list(dead), sum(dead.values())

    def sync(self, names: Iterable[str] = ()) -> None:
        """Make the named objects durable (put before, by this writer or another)."""

    def refresh(self, prefix: str) -> None:
        """Take a fresh listing of prefix for size()/exists() to answer from (remote
        backends: one LIST instead of a HEAD per object). Local: nothing to do."""

    def prepare_reads(self, names: list[str] | None = None) -> None:
        """Before workers fork to read chunks: know where they are. names: the chunks to
        be read (a remote backend that knows where each is already lists nothing);
        None: all of them, freshly listed."""
        self.refresh("chunks/")

    def stale_temps(self) -> list[str]:
        """Leftovers of interrupted writes that gc may remove (under the exclusive lock)."""
        return []

    def lock(self, *, exclusive: bool, timeout: float):
        raise NotImplementedError

    def check_private(self) -> None:
        """Refuse a store others can read (local directories; a bucket's access is its
        policy's business)."""

    def init(self) -> None:
        """Prepare a new store before its config is written (local: its directories)."""

    def require_writable(self) -> None:
        """Refuse, before anything starts, a store that can only be read."""

    def next_seq(self, last_known: Callable[[], int]) -> int:
        """The next number of the store's commit sequence; last_known() gives the highest
        one the manifests hold (a remote store has no sequence object: that, plus one)."""
        return last_known() + 1
