"""Pack files: the chunks of a remote store, many to an object, each pack with an index
object naming them (restic's design, simplified).

    packs/<xx>/<id>   the stored blobs of several chunks, concatenated; <id> is the SHA-256
                      of the pack's bytes, <xx> its first two hex digits
    index/<id>        INDEX ::= JSON {"version": 1, "pack_size": N,
                                      "chunks": [[CHUNK-ID, OFFSET, LENGTH], ...]}
                      entries by ascending offset, disjoint, inside the pack; each chunk
                      id once (64 lowercase hex digits)

    bundles/<id>      BUNDLE ::= JSON {"version": 1, "packs": [{"id": PACK-ID,
                                      "pack_size": N, "chunks": [...]}, ...]}
                      the indexes of many packs in one object (<id>: SHA-256 of it),
                      written when a snapshot is committed, so that a node loading the
                      index reads one bundle instead of one object a pack

A pack is written before its index, so a chunk exists (for dedup, listings, reads) once
the index of a pack holding it is visible; a pack without an index is an interrupted
write that gc removes. index/ alone says which packs exist: a bundle only stands in for
reading index objects of packs listed there (a bundle naming a deleted pack is harmless;
gc removes a bundle once none of its packs is left). Two writers may store one chunk in two packs: either copy serves.
Index objects are untrusted input: decode_index checks sizes, bounds, names and counts
before anything uses one, and a chunk read out of a pack is checked by the decode like
any other read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

PACK_BYTES = 16 << 20       # a put_many batch is cut into packs of about this size
RANGE_OVER = 64 << 20       # a pack larger than this is read a chunk at a time (range GETs)
MAX_INDEX_BYTES = 8 << 20   # an index object larger than this is refused unread
MAX_BUNDLE_BYTES = 256 << 20
MIN_BUNDLE = 8              # packs: fewer are read from their index objects
MAX_CHUNKS = 1 << 16        # entries in one index
MAX_PACK_BYTES = 1 << 32
VERSION = 1
INDEX = "index/"
PACKS = "packs/"
BUNDLES = "bundles/"
_ID = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_NAME = re.compile(r"^chunks/([0-9a-f]{2})/([0-9a-f]{64})$")


class BadIndex(ValueError):
    """An index object that does not describe a pack of ours."""


@dataclass(frozen=True)
class Pack:
    id: str
    size: int
    chunks: dict[str, tuple[int, int]]      # chunk id -> (offset, length) in the pack


def is_id(text: str) -> bool:
    return bool(_ID.match(text))


def pack_name(pack_id: str) -> str:
    return f"{PACKS}{pack_id[:2]}/{pack_id}"


def index_name(pack_id: str) -> str:
    return f"{INDEX}{pack_id}"


def chunk_id_of(name: str) -> str | None:
    """The chunk id an object name chunks/<xx>/<id> stands for, else None."""
    m = _CHUNK_NAME.match(name)
    return m.group(2) if m and m.group(2).startswith(m.group(1)) else None


def build(blobs: Iterable[tuple[str, bytes]]) -> tuple[bytes, Pack, bytes]:
    """(pack bytes, its Pack, its index object) for (chunk id, stored blob) pairs; a chunk
    given twice is packed once."""
    parts, chunks, off = [], {}, 0
    for cid, blob in blobs:
        if cid in chunks:
            continue
        chunks[cid] = (off, len(blob))
        parts.append(blob)
        off += len(blob)
    data = b"".join(parts)
    pack = Pack(hashlib.sha256(data).hexdigest(), len(data), chunks)
    return data, pack, encode_index(pack)


def _doc(pack: Pack) -> dict:
    entries = sorted(([cid, o, n] for cid, (o, n) in pack.chunks.items()), key=lambda e: e[1])
    return {"pack_size": pack.size, "chunks": entries}


def encode_index(pack: Pack) -> bytes:
    return json.dumps({"version": VERSION, **_doc(pack)}, separators=(",", ":")).encode()


def encode_bundle(packs: list[Pack]) -> tuple[str, bytes]:
    """(bundle id, bundle object) holding the indexes of packs."""
    raw = json.dumps({"version": VERSION, "packs": [{"id": p.id, **_doc(p)} for p in packs]},
                     separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest(), raw


def decode_bundle(raw: bytes) -> list[Pack]:
    """The packs a bundle describes, each checked as decode_index checks an index; any
    fault refuses the whole bundle (BadIndex): the index objects are read instead."""
    if len(raw) > MAX_BUNDLE_BYTES:
        raise BadIndex(f"bundle is {len(raw)} bytes")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise BadIndex("bundle is not JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or \
            not isinstance(doc.get("packs"), list):
        raise BadIndex(f"bundle: not a version {VERSION} bundle")
    out = []
    for entry in doc["packs"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise BadIndex("bundle: malformed entry")
        out.append(_pack(entry["id"], entry))
    return out


def decode_index(pack_id: str, raw: bytes) -> Pack:
    """The Pack an index object describes, or BadIndex saying why it cannot be one."""
    if len(raw) > MAX_INDEX_BYTES:
        raise BadIndex(f"index of pack {pack_id[:16]} is {len(raw)} bytes")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise BadIndex(f"index of pack {pack_id[:16]} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise BadIndex(f"index of pack {pack_id[:16]}: not a version {VERSION} index")
    return _pack(pack_id, doc)


def _pack(pack_id: str, doc: dict) -> Pack:
    if not is_id(pack_id):
        raise BadIndex(f"{pack_id[:80]!r} is not a pack id")
    size, entries = doc.get("pack_size"), doc.get("chunks")
    if not _count(size) or size > MAX_PACK_BYTES:
        raise BadIndex(f"index of pack {pack_id[:16]}: pack_size {str(size)[:40]}")
    if not isinstance(entries, list) or len(entries) > MAX_CHUNKS:
        raise BadIndex(f"index of pack {pack_id[:16]}: chunks is no list of at most {MAX_CHUNKS}")
    return Pack(pack_id, size, _entries(pack_id, size, entries))


def _entries(pack_id: str, size: int, entries: list) -> dict[str, tuple[int, int]]:
    chunks: dict[str, tuple[int, int]] = {}
    end = 0
    for e in entries:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and is_id(e[0])
                and _count(e[1]) and _count(e[2])):
            raise BadIndex(f"index of pack {pack_id[:16]}: malformed entry {str(e)[:80]}")
        cid, off, n = e
        if off < end or off + n > size:
            raise BadIndex(f"index of pack {pack_id[:16]}: chunk {cid[:16]} at {off}+{n} "
                           f"overlaps another or lies outside the pack ({size} bytes)")
        if cid in chunks:
            raise BadIndex(f"index of pack {pack_id[:16]} names chunk {cid[:16]} twice")
        chunks[cid] = (off, n)
        end = off + n
    return chunks


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class PackTable:
    """The packs whose indexes are loaded, and for each chunk the packs that hold it."""

    def __init__(self):
        self.packs: dict[str, Pack] = {}
        self.where: dict[str, list[str]] = {}       # chunk id -> pack ids

    def add(self, pack: Pack) -> None:
        if pack.id in self.packs:
            return
        self.packs[pack.id] = pack
        for cid in pack.chunks:
            self.where.setdefault(cid, []).append(pack.id)

    def drop(self, pack_id: str) -> None:
        pack = self.packs.pop(pack_id, None)
        for cid in pack.chunks if pack else ():
            holders = [p for p in self.where.get(cid, []) if p != pack_id]
            if holders:
                self.where[cid] = holders
            else:
                self.where.pop(cid, None)

    def holders(self, cid: str) -> list[tuple[Pack, int, int]]:
        """Every pack holding chunk cid, with the chunk's offset and length in it."""
        return [(self.packs[p], *self.packs[p].chunks[cid]) for p in self.where.get(cid, ())]

    def locate(self, cid: str) -> tuple[Pack, int, int] | None:
        """A pack holding chunk cid, with the chunk's offset and length in it."""
        found = self.holders(cid)
        return found[0] if found else None

    def size(self, cid: str) -> int | None:
        found = self.locate(cid)
        return found[2] if found else None

    def chunks(self) -> Iterator[tuple[str, int]]:
        """(chunk id, stored size) of every chunk, once."""
        for cid in list(self.where):
            size = self.size(cid)
            if size is not None:
                yield cid, size

    def reclaim(self, dead: set[str]) -> tuple[list[str], list[str], int]:
        """For chunks no snapshot needs: (the chunks that go, the packs that go, their
        bytes). A pack goes only when every chunk in it is dead; a pack that also holds a
        live chunk stays whole (a repack would be needed to free the rest)."""
        gone = [p for p in self.packs.values() if all(c in dead for c in p.chunks)]
        gone_ids = {p.id for p in gone}
        freed = [c for c in dead if self.where.get(c) and set(self.where[c]) <= gone_ids]
        return freed, [p.id for p in gone], sum(p.size for p in gone)
