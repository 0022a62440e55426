"""The repository: chunks, snapshots (manifests) and the lock, over a backend (a local
directory, or an S3 bucket with a local pull-through cache: backends/, cache.py).

Write ordering (docs/design.md): chunks are written (temp, fsync, rename) by the
workers as they go, the directories of every chunk a manifest names are fsynced, then
the manifest is written atomically. A snapshot is visible only once its manifest exists,
and every chunk it names is durable by then. gc and rm hold the
exclusive lock; dumps, restores and verify hold the shared one.

How chunks and manifests are encoded (plain, or encrypted with a key file) is the
store's codec (codec.py); everything here goes through it, so there is one code path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from .. import testpause
from ..errors import (AmbiguousSnapshot, IntegrityError, ManifestInvalid, SnapshotNotFound,
                      StoreError, UsageError)
from ..model import MANIFEST_VERSION, FileEntry, Manifest, Seed
from . import backends, chunker, codec, keyfile, materialise, parallel
from .backends.base import Backend, Missing, chunk_name
from .tally import Tally

FORMAT_VERSION = 1          # a plain store's config (manifests: model.MANIFEST_VERSION)
ENCRYPTED_VERSION = 2       # an encrypted store's config: gpusnap 0.1 refuses it rather
                            # than write plain chunks into it
Progress = Callable[[int], None]

# A snapshot name labels a series: dumps may reuse it, and it means the newest of them.
# It cannot be empty, and cannot be all hex digits, so it never reads as an id prefix.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")


def validate_name(name: str) -> str:
    """name, or UsageError saying why it cannot name a snapshot."""
    if not name:
        raise UsageError("a snapshot name cannot be empty")
    if not NAME_RE.match(name):
        raise UsageError(f"snapshot name {name!r}: letters, digits and . _ : @ + - only, "
                         "starting with a letter or digit, at most 128")
    if _HEX_RE.match(name):
        raise UsageError(f"snapshot name {name!r} could be read as a snapshot id prefix",
                         hint="add a letter other than a-f, e.g. a dash")
    return name


def sequence_key(m: Manifest) -> tuple:
    """Order of snapshots, oldest first: the store's commit sequence (manifests from
    before it had one come first, by creation time)."""
    return (m.seq or 0, m.created, m.id)


@dataclass
class SnapshotSummary:
    id: str
    name: str | None
    created: str
    target: str
    bytes_logical: int
    bytes_stored: int
    kind: str = "?"
    seq: int = 0

    @classmethod
    def from_manifest(cls, m: Manifest) -> "SnapshotSummary":
        return cls(m.id, m.name, m.created, m.target_label(), m.bytes_logical, m.bytes_stored,
                   m.target.kind, m.seq or 0)


def manifest_bytes(data: dict) -> bytes:
    """A manifest's JSON as the store keeps it (docs/design.md): compact, keys sorted (an
    indented one, as gpusnap wrote before, reads the same; compact is written by json's
    C encoder, several times faster for a snapshot's tens of thousands of chunks)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _loading(ids: list[str], load: Callable) -> tuple[list, dict[str, IntegrityError]]:
    """load(id) of each: what loads, and why each other one does not."""
    good, bad = [], {}
    for rid in ids:
        try:
            good.append(load(rid))
        except IntegrityError as exc:
            bad[rid] = exc
    return good, bad


def _all_loaded(scanned: tuple[list, dict[str, IntegrityError]], what: str, path: str,
                remedy: str) -> list:
    """The records of a scan (manifests or seeds), or the first one's error that does not
    load, saying that gc deletes nothing then and how to fix it."""
    good, bad = scanned
    if bad:
        rid, exc = next(iter(bad.items()))
        exc.hint = (f"gc deletes nothing while {what} cannot be read ({len(bad)} now): put "
                    f"back a good copy of {path.format(rid)}, or `{remedy.format(rid)}`")
        raise exc
    return good


def _no_seed(seed_id: str) -> UsageError:
    return UsageError(f"no seed {seed_id}", hint="`gpusnap seed ls` lists them")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _ingest_batch(job, batch_index: int) -> list[tuple[str, int, int]]:
    """In a worker: read each span of the batch, store it as a chunk if new."""
    repo, paths, batches = job
    _pause_before_second_batch()
    out, fds = [], {}
    pending = {} if repo.backend.batches_puts else None
    try:
        for index, off, n in batches[batch_index]:
            fd = fds.get(index)
            if fd is None:
                fd = fds[index] = os.open(paths[index], os.O_RDONLY | os.O_CLOEXEC)
            data = codec.scratch(n)
            if os.preadv(fd, [data], off) != n:
                raise StoreError(f"{paths[index]} changed while it was read")
            out.append(repo._put_chunk(data, pending))
        if pending:
            out = repo.not_new(out, repo.backend.put_many(list(pending.items())))
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


_first_batch_by: int | None = None      # the worker process that took a batch already


def _pause_before_second_batch() -> None:
    """GPUSNAP_TEST_PAUSE=ingest_batch (testpause.py): a forked worker that has stored its
    first batch waits before the next one, so the batches after it are still queued."""
    global _first_batch_by
    if not testpause.wanted("ingest_batch") or threading.current_thread() is not threading.main_thread():
        return          # unset, or a thread (parallel.py's fallback): never paused
    if _first_batch_by == os.getpid():
        testpause.pause("ingest_batch")
    _first_batch_by = os.getpid()


def _verify_batch(job, batch_index: int) -> list[dict]:
    """In a worker: decode and re-hash each chunk of the batch; what does not match."""
    repo, batches = job
    bad = []
    for cid, n in batches[batch_index]:
        try:
            repo.decode_chunk(repo.read_blob(cid), cid, n)
        except IntegrityError as exc:
            bad.append({"chunk": cid, "error": exc.message})
    return bad


class Repository:
    def __init__(self, path: str, store_codec: codec.PlainCodec | None = None,
                 backend: Backend | None = None):
        """path: the store's directory; for a remote store, its local cache directory
        (work dirs and failed logs go there as they would into a local store)."""
        self.path = os.path.abspath(path)
        self.codec = store_codec or codec.PLAIN
        self.backend = backend or backends.for_location(self.path)
        self.url = self.backend.url
        self.chunks_dir = os.path.join(self.path, "chunks")
        self.snapshots_dir = os.path.join(self.path, "snapshots")
        self.tmp_dir = os.path.join(self.path, "tmp")
        self.lock_path = os.path.join(self.path, "lock")
        self.last_materialise: dict | None = None
        self.compress_level = codec.DEFAULT_LEVEL     # of chunks this process writes

    # ---- opening -------------------------------------------------------------------
    @staticmethod
    def exists(path: str) -> bool:
        if backends.is_remote(path):
            backend = backends.for_location(path)
            backend.check_bucket()              # a missing bucket is an error, not "no store"
            return backend.exists("config")
        return os.path.exists(os.path.join(os.path.abspath(path), "config"))

    @classmethod
    def open(cls, path: str, *, create: bool = True, key_file: str | None = None,
             cache: str | None = None, cache_size: int | str | None = None) -> "Repository":
        """Open (or create) the store at path (a directory, or s3://BUCKET/PREFIX with its
        chunk cache under cache, at most cache_size bytes). With key_file, a new store is
        created encrypted and an existing one must be encrypted with that key (WrongKey).

        Everything is checked before anything is written: a local path must be missing, or
        a directory of ours, private, holding a store or nothing; a symlink at the path
        or inside the store is refused, never followed."""
        repo = cls._at(path, cache, cache_size)
        key = keyfile.load(key_file) if key_file else None
        if not repo.backend.exists("config"):
            if not create:
                raise StoreError(f"no gpusnap store at {repo.url}",
                                 hint="check --store (or GPUSNAP_STORE); `gpusnap dump` and "
                                      "`gpusnap import` create a store, nothing else does")
            repo._init(codec.EncryptedCodec(key) if key else codec.PLAIN)
        repo.backend.check_private()
        try:
            conf = json.loads(repo.backend.get("config"))
        except Missing:
            raise StoreError(f"the config of store {repo.url} is missing") from None
        except ValueError:
            raise StoreError(f"the config of store {repo.url} is unreadable") from None
        version = conf.get("version")
        if version not in (FORMAT_VERSION, ENCRYPTED_VERSION) or \
                (version == ENCRYPTED_VERSION) != bool(conf.get("encryption")):
            raise StoreError(f"store format {version} is not supported (this gpusnap: "
                             f"{FORMAT_VERSION}, {ENCRYPTED_VERSION} encrypted)")
        repo.codec = codec.for_config(conf, key, f"store {repo.url}")
        return repo

    @classmethod
    def _at(cls, location: str, cache: str | None, cache_size) -> "Repository":
        if not backends.is_remote(location):
            return cls(location)
        from . import cache as chunk_cache
        from .backends.s3 import S3Backend
        url = location.rstrip("/")
        root = chunk_cache.store_dir(cache or os.environ.get("GPUSNAP_CACHE") or
                                     chunk_cache.DEFAULT_DIR, url)
        size = chunk_cache.parse_size(cache_size or os.environ.get("GPUSNAP_CACHE_SIZE"))
        backend = S3Backend(url, chunk_cache.ChunkCache(root, size).open())
        backend.check_bucket()
        return cls(root, backend=backend)

    def _init(self, store_codec: codec.PlainCodec) -> None:
        """A new store: a local one in a missing or empty private directory (created 0700
        if missing; an existing one is checked, never chmodded)."""
        self.backend.init()
        version = ENCRYPTED_VERSION if store_codec.encryption else FORMAT_VERSION
        # if_absent: two nodes creating one remote store at once agree on the first config
        self.backend.put("config", json.dumps(
            {"version": version, "id": secrets.token_hex(16),
             "chunk_size": chunker.CHUNK_SIZE, **store_codec.describe()}).encode(), if_absent=True)

    def require_writable(self) -> None:
        """Refuse, before anything starts, a store that can only be read (a read-only mount,
        a directory without write permission): a dump would fail only at ingest."""
        self.backend.require_writable()

    def shared_lock(self, timeout: float = 30.0):
        return self.backend.lock(exclusive=False, timeout=timeout)

    def exclusive_lock(self, timeout: float = 30.0):
        return self.backend.lock(exclusive=True, timeout=timeout)

    # ---- chunks --------------------------------------------------------------------
    @staticmethod
    def chunk_name(cid: str) -> str:
        return chunk_name(cid)

    def chunk_path(self, cid: str) -> str:
        """A local store's chunk file (for a remote store: where its cache keeps it)."""
        return os.path.join(self.chunks_dir, cid[:2], cid)

    def has_chunk(self, cid: str) -> bool:
        return cid == codec.ZERO_ID or self.backend.exists(self.chunk_name(cid))

    def missing_chunks(self, cids: Iterable[str]) -> list[str]:
        """The chunks of cids that the store does not hold (has_chunk of each, at once)."""
        names = {self.chunk_name(cid): cid for cid in cids if cid != codec.ZERO_ID}
        return [names[name] for name in self.backend.missing(names)]

    def stored_size(self, cid: str) -> int | None:
        """A stored chunk's size in the store (compressed), None when absent."""
        return self.backend.size(self.chunk_name(cid))

    def _put_chunk(self, data: memoryview, pending: dict | None = None) -> tuple[str, int, int]:
        """Store one chunk if new; (id, stored bytes, new bytes). With pending, a new
        chunk goes there (name -> blob) for the caller to put_many at once."""
        if codec.is_zero(data):
            return codec.ZERO_ID, 0, 0
        cid = self.codec.chunk_id(data)
        if pending is not None and self.chunk_name(cid) in pending:     # twice in a batch
            return cid, len(pending[self.chunk_name(cid)]), 0
        size = self.stored_size(cid)
        if size is not None:
            return cid, size, 0
        blob = self.codec.encode(cid, data, self.compress_level)
        if pending is None:
            self.store_blob(cid, blob)
            return cid, len(blob), len(blob)
        size = self.backend.claim(self.chunk_name(cid), len(blob))
        if size is not None:                # another batch of this ingest sends it
            return cid, size, 0
        pending[self.chunk_name(cid)] = bytes(blob)      # blob may be scratch space
        return cid, len(blob), len(blob)

    def not_new(self, rows: list, left) -> list:
        """rows (tuples ending in chunk id, stored bytes, new bytes), those of the chunks
        a batched put found stored meanwhile (left: their names) counted as not new."""
        if not left:
            return rows
        return [(*row[:-1], 0) if self.chunk_name(row[-3]) in left else row for row in rows]

    def store_blob(self, cid: str, blob: bytes) -> None:
        """Write a chunk's stored bytes under its id (write-once; atomic visibility).

        Its bytes are durable once this returns, its name once commit() syncs the
        manifest's chunks. The caller vouches that
        blob decodes to bytes with this id (ingest made it; import verified it).
        """
        self.backend.put(self.chunk_name(cid), blob, durable=False)

    def read_blob(self, cid: str) -> bytes:
        """A chunk's stored (compressed, maybe encrypted) bytes, unverified."""
        try:
            return self.backend.get(self.chunk_name(cid))
        except Missing:
            raise IntegrityError(f"chunk {cid[:16]} is missing from the store") from None

    def read_blobs(self, cids: list[str]):
        """read_blob of each, in order; a remote store fetches them concurrently."""
        if not hasattr(self.backend, "verified"):
            yield from (self.read_blob(cid) for cid in cids)
            return
        try:
            yield from self.backend.get_many([self.chunk_name(c) for c in cids])
        except Missing as exc:
            raise IntegrityError(f"chunk {str(exc)[-64:][:16]} is missing from the store") from None

    def decode_chunk(self, blob, cid: str, size: int, out: memoryview | None = None,
                     check: str = "id") -> tuple[memoryview, bytes]:
        """codec.decode_view of chunk cid's stored bytes, then verified(): (the plain
        bytes, the stored bytes that passed). Bytes that fail the check and may have come
        from a remote store's cache (not fsynced: a host's crash can leave a torn file
        there) are read once more from the store itself (backend.reread); only what fails
        then is an IntegrityError."""
        try:
            view = self.codec.decode_view(blob, cid, size, out, check=check)
        except IntegrityError:
            reread = getattr(self.backend, "reread", None)
            blob = reread(self.chunk_name(cid)) if reread else None
            if blob is None:
                raise
            view = self.codec.decode_view(blob, cid, size, out, check=check)
        self.verified(cid, blob)
        return view, blob

    def verified(self, cid: str, blob) -> None:
        """blob decoded to chunk cid: a remote store's cache may keep it."""
        keep = getattr(self.backend, "verified", None)
        if keep:
            keep(self.chunk_name(cid), blob)

    def prepare_reads(self, cids: Iterable[str] | None = None) -> None:
        """Load where the store's chunks are before workers fork to read them (an s3
        store: one listing and the index objects not seen yet, instead of one a worker).
        cids: the chunks to be read (none listed again when the backend knows them all);
        None: a fresh listing."""
        self.backend.prepare_reads(None if cids is None else
                                   [self.chunk_name(c) for c in cids if c != codec.ZERO_ID])

    @contextlib.contextmanager
    def prefetch(self, manifest: Manifest, first: Iterable[str] = (), *, finish: bool = False):
        """While the block runs, a remote store fetches the snapshot's chunks into its
        cache ahead of the reads (backends/prefetch.py): the files named in first, then
        the others, each file's chunks in order. The block's end stops it (finish: waits
        for every chunk first). A local store: nothing; nor where another thread runs
        (the helper is forked). The block gets the helper (its .packs and .bytes), or None."""
        start = getattr(self.backend, "prefetch", None)
        if start is None:
            yield None
            return
        ahead = set(first)
        files = sorted(manifest.files, key=lambda f: f.path not in ahead)
        helper = start([self.chunk_name(cid) for f in files for cid, _n in f.chunks
                        if cid != codec.ZERO_ID])
        ok = False
        try:
            yield helper
            ok = True
        finally:
            if helper is not None:
                helper.stop(finish=finish and ok)

    def read_chunk(self, cid: str, size: int) -> bytes:
        if cid == codec.ZERO_ID:
            return bytes(size)
        return self.codec.decode(self.read_blob(cid), cid, size)

    # ---- ingest (dump side) ----------------------------------------------------------
    def ingest_dir(self, src: str, progress: Progress | None = None) -> tuple[list[FileEntry], dict]:
        """Chunk every regular file under src into the store, on worker processes
        (parallel.py says why).

        Returns (file entries for the manifest, byte counts). The chunks' bytes are
        durable (each worker fsyncs what it writes); their names are once commit() has
        synced their directories, before it writes the manifest.
        """
        files = []
        for root, _dirs, names in os.walk(src):
            for name in sorted(names):
                full = os.path.join(root, name)
                st = os.lstat(full)
                if stat.S_ISREG(st.st_mode):
                    files.append((os.path.relpath(full, src), full, st))
        files.sort()
        chunks, tally = self.ingest_spans(
            [full for _rel, full, _st in files],
            [chunker.boundaries(full, st.st_size) for _rel, full, st in files], progress)
        entries = [FileEntry(rel, st.st_size, stat.S_IMODE(st.st_mode), chunks[index])
                   for index, (rel, _full, st) in enumerate(files)]
        logical = sum(st.st_size for _rel, _full, st in files)
        return entries, {"bytes_logical": logical, "bytes_stored": tally.stored, "bytes_new": tally.new}

    def ingest_spans(self, paths: list[str], spans: list[list[tuple[int, int]]],
                     progress: Progress | None = None,
                     workers: int | None = None) -> tuple[list[list[tuple[str, int]]], Tally]:
        """Each (offset, length) span of each file stored as a chunk if new, on worker
        processes (default parallel.workers()): ([(chunk id, length), ...] a file, the byte
        counts). Durable as for ingest_dir."""
        self.backend.refresh("chunks/")         # one listing instead of a lookup a chunk
        items = [(index, off, n) for index, file_spans in enumerate(spans) for off, n in file_spans]
        batches = parallel.batches(items, lambda span: span[2])
        _mode, results = parallel.run(_ingest_batch, (self, paths, batches),
                                      len(batches), workers or parallel.workers(), ordered=True)
        chunks: list[list[tuple[str, int]]] = [[] for _ in paths]
        tally = Tally()
        try:
            for batch, outcome in zip(batches, results):
                for (index, _off, n), (cid, size_stored, size_new) in zip(batch, outcome):
                    chunks[index].append((cid, n))
                    tally.add(cid, size_stored, size_new)
                if progress:
                    progress(sum(n for _i, _o, n in batch))
        finally:
            results.close()
        return chunks, tally

    # ---- seeds (store/seed.py) --------------------------------------------------------
    def add_seed(self, paths: list[str], name: str | None = None,
                 progress: Progress | None = None, workers: int | None = None,
                 sources: list[str] | None = None) -> tuple[Seed, Tally]:
        """Store each weights file's tensors as a dump's page stream would cut them, then
        record them (seeds/<id>.json) so gc keeps them: the chunks durable first, their
        names, then the record, as commit() does for a manifest. Under the shared lock.
        sources: the files' names in the record (their absolute paths where not given:
        `dump --seed auto` reads them through descriptors it holds)."""
        from . import seed as cutting
        spans = [cutting.spans(p) for p in paths]          # every file checked before a write
        chunks, tally = self.ingest_spans(paths, spans, progress, workers)
        sources = cutting.sources_of(paths, sources)
        entries = [FileEntry(os.path.basename(s), sum(n for _c, n in cs), 0o600, cs)
                   for s, cs in zip(sources, chunks)]
        record = Seed(id=secrets.token_hex(8), files=entries, created=_now(), name=name,
                      sources=sources)
        data = record.to_json()
        Seed.from_json(data)                    # what is written must load
        self._publish("seeds/", "seed", record.id, data, record.chunk_sizes(),
                      "the seed was recorded")
        return record, tally

    def seed_ids(self) -> list[str]:
        return self._record_ids("seeds/")

    def load_seed(self, seed_id: str) -> Seed:
        try:
            raw = self.backend.get(f"seeds/{seed_id}.json")
        except Missing:
            raise _no_seed(seed_id) from None
        return self._record(Seed, raw, seed_id, "seed", f"seed record {seed_id}")

    def seeds(self) -> tuple[list[Seed], dict[str, IntegrityError]]:
        """Every seed record that loads (oldest first), and why each other one does not."""
        good, bad = _loading(self.seed_ids(), self.load_seed)
        return sorted(good, key=lambda s: (s.created, s.id)), bad

    def remove_seeds(self, seed_ids: Iterable[str]) -> list[str]:
        """Their chunks go at the next gc, but for those a snapshot or another seed uses."""
        removed = []
        for sid in seed_ids:
            if not re.fullmatch(r"[0-9a-f]{16}", sid):
                raise _no_seed(sid)
            try:
                self.backend.delete(f"seeds/{sid}.json")
            except Missing:
                raise _no_seed(sid) from None
            removed.append(sid)
        return removed

    def new_snapshot_id(self) -> str:
        return secrets.token_hex(8)

    def commit(self, manifest: Manifest) -> str:
        """Make a snapshot visible: make every chunk it names durable (fsync their
        directories; their bytes were fsynced as they were written, by this dump or the
        one that stored them first), then write its manifest atomically.

        Assigns the id and creation time where they are empty. Refuses (ManifestInvalid)
        a manifest that load() would refuse."""
        manifest.id = manifest.id or self.new_snapshot_id()
        manifest.created = manifest.created or _now()
        manifest.format = MANIFEST_VERSION
        manifest.seq = self._next_seq()
        data = manifest.to_json()
        Manifest.from_json(data)                # what is written must load
        self._publish("snapshots/", "snapshot", manifest.id, data, manifest.chunk_sizes(), "commit")
        return manifest.id

    def sync_ahead(self, manifest: Manifest) -> None:
        """What commit() makes durable, done ahead of it by a caller with time to spare
        (a dump waiting for its original's CUDA restore): the directories of the
        manifest's chunks are fsynced, and commit() then finds them clean."""
        self.backend.sync(self.chunk_name(c) for c in manifest.chunk_sizes())

    def _publish(self, prefix: str, kind: str, rid: str, data: dict, chunks: dict[str, int],
                 when: str) -> None:
        """Write a record (a manifest, or a seed record) at prefix<rid>.json, sealed as
        kind, once every chunk it names is durable (their directories fsynced here, their
        bytes as they were written); IntegrityError when one vanished before `when`."""
        self.backend.refresh("chunks/")
        missing = self.missing_chunks(chunks)
        if missing:
            raise IntegrityError(f"{len(missing)} chunks vanished before {when} (concurrent gc?)")
        self.backend.sync(self.chunk_name(c) for c in chunks)
        self.backend.put(f"{prefix}{rid}.json", self.codec.seal(rid, manifest_bytes(data), kind=kind))

    def _next_seq(self) -> int:
        """The next number of the store's commit sequence: strictly increasing, so
        "newest" never depends on clock resolution or skew."""
        return self.backend.next_seq(lambda: max([m.seq or 0 for m in self.manifests()], default=0))

    @staticmethod
    def file_entries(manifest: Manifest) -> list[FileEntry]:
        """Every file a manifest stores: the images, then CRIU's logs."""
        return manifest.file_entries()

    @classmethod
    def chunk_sizes(cls, manifest: Manifest) -> dict[str, int]:
        """Distinct stored (non-zero) chunk id -> plain size, over files and logs."""
        return manifest.chunk_sizes()

    # ---- snapshots -----------------------------------------------------------------
    def snapshot_ids(self) -> list[str]:
        return self._record_ids("snapshots/")

    def _record_ids(self, prefix: str) -> list[str]:
        """The ids of the records <prefix><id>.json (temp files and deeper names left out)."""
        return sorted(n[len(prefix):-5] for n, _size in self.backend.list(prefix)
                      if n.endswith(".json") and "/" not in n[len(prefix):])

    def manifest_blob(self, snap_id: str) -> bytes:
        """A manifest file's bytes as stored (sealed in an encrypted store)."""
        try:
            return self.backend.get(f"snapshots/{snap_id}.json")
        except Missing:
            raise SnapshotNotFound(f"no snapshot {snap_id}") from None

    def load(self, snap_id: str) -> Manifest:
        """The snapshot's manifest, validated: IntegrityError when it does not parse,
        ManifestInvalid (an IntegrityError) when it parses but is malformed."""
        return self._record(Manifest, self.manifest_blob(snap_id), snap_id, "snapshot",
                            f"manifest of snapshot {snap_id}")

    def _record(self, cls, raw: bytes, rid: str, kind: str, what: str):
        """A manifest or seed record from its stored bytes (unsealed as kind), validated,
        naming itself rid."""
        try:
            data = json.loads(self.codec.unseal(rid, raw, kind=kind))
        except ValueError:
            raise IntegrityError(f"{what} is unreadable (truncated?)") from None
        try:
            record = cls.from_json(data)
        except ManifestInvalid as exc:
            raise ManifestInvalid(f"{what} is invalid: {exc.message}", hint=exc.hint) from None
        if record.id != rid:
            raise ManifestInvalid(f"{what} names itself {record.id}")
        return record

    def scan(self) -> tuple[list[Manifest], dict[str, IntegrityError]]:
        """Every manifest that loads (oldest first), and why each other one does not."""
        good, bad = _loading(self.snapshot_ids(), self.load)
        return sorted(good, key=sequence_key), bad

    def manifests(self) -> list[Manifest]:
        """The manifests that load, oldest first by the commit sequence (scan() also says
        which do not)."""
        return self.scan()[0]

    def load_ref(self, ref: str) -> Manifest:
        """The manifest of the snapshot ref names, as load(resolve(ref)), in one read when
        ref is the id of a snapshot (resolve lists the snapshots first): an id comes first
        among the meanings of a ref, and a name is never all hex digits."""
        if len(ref) <= 64 and _HEX_RE.match(ref):
            try:
                return self.load(ref)
            except SnapshotNotFound:
                pass                        # a prefix of an id, or no snapshot at all
        return self.load(self.resolve(ref))

    def resolve(self, ref: str) -> str:
        """Snapshot id from, in this order: an id, a name (the newest snapshot of that
        name, by commit sequence), a unique id prefix."""
        if not ref:
            raise UsageError("an empty snapshot reference names nothing")
        ids = self.snapshot_ids()
        if ref in ids:
            return ref
        named = [m for m in self.manifests() if m.name == ref]
        if named:
            return named[-1].id
        matches = [i for i in ids if i.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise AmbiguousSnapshot(f"'{ref}' matches {len(matches)} snapshots: {', '.join(matches[:5])}")
        raise SnapshotNotFound(f"no snapshot with id or name '{ref}'")

    def list(self) -> list[SnapshotSummary]:
        return [SnapshotSummary.from_manifest(m) for m in self.manifests()]

    def forget_plan(self, keep_last: int, name: str | None = None) -> dict:
        """Which snapshots `forget --keep-last` removes: in each series (snapshots of one
        name; the unnamed ones are one series), all but the keep_last newest. With name,
        that series only. Pure reading: {"keep": [ids], "forget": [ids]}, oldest first."""
        series: dict = {}
        for m in self.manifests():
            if name is None or m.name == name:
                series.setdefault(m.name, []).append(m.id)
        keep, forget = [], []
        for ids in series.values():
            cut = max(0, len(ids) - keep_last)
            forget += ids[:cut]
            keep += ids[cut:]
        return {"keep": keep, "forget": forget}

    # ---- materialise (restore side) ---------------------------------------------------
    def materialise(self, manifest: Manifest, dest: str, progress: Progress | None = None,
                    *, which: str = "files", only: dict | None = None) -> None:
        """Write a snapshot's files (which: "files" or "logs") under dest, verifying each
        chunk as it is decoded (materialise.py says how). Zero chunks are left as holes.
        only: per path, the byte ranges to write (the rest stays a hole: the uffd page
        path places those pages itself). Any mismatch raises IntegrityError; the caller
        removes dest. Statistics in self.last_materialise."""
        self.prepare_reads(cid for f in getattr(manifest, which) for cid, _n in f.chunks)
        self.last_materialise = materialise.write_files(self, getattr(manifest, which), dest,
                                                        parallel.workers(), progress, only)

    # ---- verify, rm, gc -----------------------------------------------------------------
    def verify(self, snap_ids: Iterable[str] | None = None, progress: Progress | None = None) -> dict:
        """Re-hash every chunk the snapshots use. Returns {'checked', 'bad': [...]}."""
        ids = list(snap_ids) if snap_ids is not None else self.snapshot_ids()
        wanted: dict[str, int] = {}
        bad = []
        for sid in ids:
            try:
                m = self.load(sid)
            except IntegrityError as exc:
                bad.append({"snapshot": sid, "error": exc.message})
                continue
            wanted.update(self.chunk_sizes(m))

        batches = parallel.batches(sorted(wanted.items()), lambda item: item[1])
        self.prepare_reads()
        _mode, results = parallel.run(_verify_batch, (self, batches), len(batches), parallel.workers(),
                                      ordered=True)
        try:
            for batch, found in zip(batches, results):
                bad += found
                if progress:
                    progress(sum(n for _cid, n in batch))
        finally:
            results.close()
        return {"snapshots": len(ids), "chunks_checked": len(wanted), "bad": bad}

    def remove(self, snap_ids: Iterable[str]) -> list[str]:
        removed = []
        for sid in snap_ids:
            try:
                self.backend.delete(f"snapshots/{sid}.json")
                removed.append(sid)
            except Missing:
                raise SnapshotNotFound(f"no snapshot {sid}") from None
        return removed

    def gc_plan(self, without: Iterable[str] = ()) -> dict:
        """Chunks no manifest references (those that go: in an s3 store, the chunks of
        packs no live chunk is in; "kept": how many others stay), the objects that deleting
        them means, and stale temp files; a seed's chunks count as used. Pure reading.
        Refuses (IntegrityError) while a manifest or a seed record does not load: which
        chunks it needs is unknown.
        without: snapshots to count as removed already (forget --dry-run)."""
        live: set[str] = set()
        gone = set(without)
        good = _all_loaded(self.scan(), "a manifest", "snapshots/{}.json", "gpusnap rm {}")
        seeds = _all_loaded(self.seeds(), "a seed record", "seeds/{}.json", "gpusnap seed rm {}")
        for record in [m for m in good if m.id not in gone] + seeds:
            live.update(record.chunk_sizes())
        self.backend.check_private()        # no symlink to follow out of the store
        dead = {name: size for name, size in self.backend.list("chunks/")
                if name.rsplit("/", 1)[-1] not in live}
        chunks, objects, freed = self.backend.reclaim(dead)
        return {"chunks": chunks, "objects": objects, "bytes": freed,
                "kept": len(dead) - len(chunks), "temps": self.backend.stale_temps()}

    def gc_execute(self, plan: dict) -> None:
        self.backend.delete_many(plan["objects"] + plan["temps"])
