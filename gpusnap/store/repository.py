"""The repository: chunks, snapshots (manifests) and the lock, on a local directory.

Write ordering (docs/design.md): chunks are written (temp, rename), the filesystem is
synced, then the manifest is written atomically. A snapshot is visible only once its
manifest exists, and every chunk it names is durable by then. gc and rm hold the
exclusive lock; dumps, restores and verify hold the shared one.

How chunks and manifests are encoded (plain, or encrypted with a key file) is the
store's codec (codec.py); everything here goes through it, so there is one code path.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import stat
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from ..errors import (AmbiguousSnapshot, InsecureStore, IntegrityError, ManifestInvalid,
                      SnapshotNotFound, StoreError)
from ..model import MANIFEST_VERSION, FileEntry, Manifest
from . import chunker, codec, fsutil, keyfile, materialise, parallel
from .lock import store_lock

FORMAT_VERSION = 1          # a plain store's config (manifests: model.MANIFEST_VERSION)
ENCRYPTED_VERSION = 2       # an encrypted store's config: gpusnap 0.1 refuses it rather
                            # than write plain chunks into it
Progress = Callable[[int], None]


@dataclass
class SnapshotSummary:
    id: str
    name: str | None
    created: str
    target: str
    bytes_logical: int
    bytes_stored: int

    @classmethod
    def from_manifest(cls, m: Manifest) -> "SnapshotSummary":
        return cls(m.id, m.name, m.created, m.target_label(), m.bytes_logical, m.bytes_stored)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _threads() -> int:
    """Worker processes for ingest, materialise and verify (parallel.py): GPUSNAP_THREADS,
    else the CPUs (at most 16)."""
    explicit = os.environ.get("GPUSNAP_THREADS")
    if explicit and explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    return max(2, min(16, os.cpu_count() or 2))



def _ingest_batch(job, batch_index: int) -> list[tuple[str, int, int]]:
    """In a worker: read each span of the batch, store it as a chunk if new."""
    repo, paths, batches = job
    out, fds = [], {}
    try:
        for index, off, n in batches[batch_index]:
            fd = fds.get(index)
            if fd is None:
                fd = fds[index] = os.open(paths[index], os.O_RDONLY | os.O_CLOEXEC)
            data = codec.scratch(n)
            if os.preadv(fd, [data], off) != n:
                raise StoreError(f"{paths[index]} changed while it was read")
            out.append(repo._put_chunk(data))
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def _verify_batch(job, batch_index: int) -> list[dict]:
    """In a worker: decode and re-hash each chunk of the batch; what does not match."""
    repo, batches = job
    bad = []
    for cid, n in batches[batch_index]:
        try:
            repo.codec.decode_view(repo.read_blob(cid), cid, n)
        except IntegrityError as exc:
            bad.append({"chunk": cid, "error": exc.message})
    return bad


class Repository:
    def __init__(self, path: str, store_codec: codec.PlainCodec | None = None):
        self.path = os.path.abspath(path)
        self.codec = store_codec or codec.PLAIN
        self.chunks_dir = os.path.join(self.path, "chunks")
        self.snapshots_dir = os.path.join(self.path, "snapshots")
        self.tmp_dir = os.path.join(self.path, "tmp")
        self.lock_path = os.path.join(self.path, "lock")
        self.last_materialise: dict | None = None

    # ---- opening -------------------------------------------------------------------
    @staticmethod
    def exists(path: str) -> bool:
        return os.path.exists(os.path.join(os.path.abspath(path), "config"))

    @classmethod
    def open(cls, path: str, *, create: bool = True, key_file: str | None = None) -> "Repository":
        """Open (or create) the store at path. With key_file, a new store is created
        encrypted and an existing one must be encrypted with that key (WrongKey)."""
        repo = cls(path)
        key = keyfile.load(key_file) if key_file else None
        config = os.path.join(repo.path, "config")
        if not os.path.exists(config):
            if not create:
                raise StoreError(f"no gpusnap store at {repo.path}",
                                 hint="check --store (or GPUSNAP_STORE); `gpusnap dump` and "
                                      "`gpusnap import` create a store, nothing else does")
            repo._init(codec.EncryptedCodec(key) if key else codec.PLAIN)
        repo._check_private()
        try:
            with open(config) as f:
                conf = json.load(f)
        except ValueError:
            raise StoreError(f"the config of store {repo.path} is unreadable") from None
        version = conf.get("version")
        if version not in (FORMAT_VERSION, ENCRYPTED_VERSION) or \
                (version == ENCRYPTED_VERSION) != bool(conf.get("encryption")):
            raise StoreError(f"store format {version} is not supported (this gpusnap: "
                             f"{FORMAT_VERSION}, {ENCRYPTED_VERSION} encrypted)")
        repo.codec = codec.for_config(conf, key, f"store {repo.path}")
        return repo

    def _init(self, store_codec: codec.PlainCodec) -> None:
        old = os.umask(0o077)
        try:
            for d in (self.path, self.chunks_dir, self.snapshots_dir, self.tmp_dir):
                os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(self.path, 0o700)
            version = ENCRYPTED_VERSION if store_codec.encryption else FORMAT_VERSION
            fsutil.write_atomic(os.path.join(self.path, "config"), json.dumps(
                {"version": version, "id": secrets.token_hex(16),
                 "chunk_size": chunker.CHUNK_SIZE, **store_codec.describe()}).encode())
        finally:
            os.umask(old)

    def _check_private(self) -> None:
        st = os.stat(self.path)
        if st.st_uid != os.geteuid():
            raise InsecureStore(f"store {self.path} belongs to uid {st.st_uid}, not to you")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InsecureStore(f"store {self.path} is open to other users (mode {st.st_mode & 0o777:o})",
                                hint=f"chmod 700 {self.path}")

    def shared_lock(self, timeout: float = 30.0):
        return store_lock(self.lock_path, exclusive=False, timeout=timeout)

    def exclusive_lock(self, timeout: float = 30.0):
        return store_lock(self.lock_path, exclusive=True, timeout=timeout)

    # ---- chunks --------------------------------------------------------------------
    def chunk_path(self, cid: str) -> str:
        return os.path.join(self.chunks_dir, cid[:2], cid)

    def has_chunk(self, cid: str) -> bool:
        return cid == codec.ZERO_ID or os.path.exists(self.chunk_path(cid))

    def _put_chunk(self, data: memoryview) -> tuple[str, int, int]:
        """Store one chunk if new; (id, stored bytes, new bytes)."""
        if codec.is_zero(data):
            return codec.ZERO_ID, 0, 0
        cid = self.codec.chunk_id(data)
        path = self.chunk_path(cid)
        try:
            return cid, os.stat(path).st_size, 0
        except FileNotFoundError:
            pass
        blob = self.codec.encode(cid, data)
        self.store_blob(cid, blob)
        return cid, len(blob), len(blob)

    def store_blob(self, cid: str, blob: bytes) -> None:
        """Write a chunk's stored bytes under its id (temp name in tmp/, then rename).

        Not durable until the next commit() syncs the filesystem. The caller vouches that
        blob decodes to bytes with this id (ingest made it; import verified it).
        """
        path = self.chunk_path(cid)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = os.path.join(self.tmp_dir, f"{cid}.{os.getpid()}.{threading.get_ident()}")
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
                      "wb", closefd=True) as f:
                f.write(blob)
            os.rename(tmp, path)
        except BaseException as exc:    # an ingest worker ended by SIGTERM too: no temp left
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(exc, OSError):
                fsutil.raise_os_error(exc, path)
            raise

    def read_blob(self, cid: str) -> bytes:
        """A chunk's stored (compressed, maybe encrypted) bytes, unverified."""
        try:
            with open(self.chunk_path(cid), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise IntegrityError(f"chunk {cid[:16]} is missing from the store") from None

    def read_chunk(self, cid: str, size: int) -> bytes:
        if cid == codec.ZERO_ID:
            return bytes(size)
        return self.codec.decode(self.read_blob(cid), cid, size)

    # ---- ingest (dump side) ----------------------------------------------------------
    def ingest_dir(self, src: str, progress: Progress | None = None) -> tuple[list[FileEntry], dict]:
        """Chunk every regular file under src into the store, on worker processes
        (parallel.py says why).

        Returns (file entries for the manifest, byte counts). Chunks are not yet durable:
        commit() syncs before it writes the manifest.
        """
        files = []
        for root, _dirs, names in os.walk(src):
            for name in sorted(names):
                full = os.path.join(root, name)
                st = os.lstat(full)
                if stat.S_ISREG(st.st_mode):
                    files.append((os.path.relpath(full, src), full, st))
        files.sort()
        spans = [(index, off, n) for index, (_rel, full, st) in enumerate(files)
                 for off, n in chunker.boundaries(full, st.st_size)]
        batches = parallel.batches(spans, lambda span: span[2])
        _mode, results = parallel.run(_ingest_batch, (self, [f[1] for f in files], batches),
                                      len(batches), _threads(), ordered=True)
        chunks: list[list[tuple[str, int]]] = [[] for _ in files]
        stored = new = 0
        seen: set[str] = set()
        try:
            for batch, outcome in zip(batches, results):
                for (index, _off, n), (cid, size_stored, size_new) in zip(batch, outcome):
                    chunks[index].append((cid, n))
                    if cid not in seen:
                        seen.add(cid)
                        stored += size_stored
                    new += size_new
                if progress:
                    progress(sum(n for _i, _o, n in batch))
        finally:
            results.close()
        entries = [FileEntry(rel, st.st_size, stat.S_IMODE(st.st_mode), chunks[index])
                   for index, (rel, _full, st) in enumerate(files)]
        logical = sum(st.st_size for _rel, _full, st in files)
        return entries, {"bytes_logical": logical, "bytes_stored": stored, "bytes_new": new}

    def new_snapshot_id(self) -> str:
        return secrets.token_hex(8)

    def commit(self, manifest: Manifest) -> str:
        """Make a snapshot visible: sync the chunks, then write its manifest atomically.

        Assigns the id and creation time where they are empty. Refuses (ManifestInvalid)
        a manifest that load() would refuse."""
        manifest.id = manifest.id or self.new_snapshot_id()
        manifest.created = manifest.created or _now()
        manifest.format = MANIFEST_VERSION
        data = manifest.to_json()
        Manifest.from_json(data)                # what is written must load
        missing = [c for c in manifest.chunk_sizes() if not self.has_chunk(c)]
        if missing:
            raise IntegrityError(f"{len(missing)} chunks vanished before commit (concurrent gc?)")
        fsutil.syncfs(self.path)
        fsutil.write_atomic(os.path.join(self.snapshots_dir, manifest.id + ".json"),
                            self.codec.seal(manifest.id, json.dumps(data, indent=1,
                                                                    sort_keys=True).encode()))
        return manifest.id

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
        return sorted(n[:-5] for n in os.listdir(self.snapshots_dir) if n.endswith(".json"))

    def manifest_blob(self, snap_id: str) -> bytes:
        """A manifest file's bytes as stored (sealed in an encrypted store)."""
        try:
            with open(os.path.join(self.snapshots_dir, snap_id + ".json"), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise SnapshotNotFound(f"no snapshot {snap_id}") from None

    def load(self, snap_id: str) -> Manifest:
        """The snapshot's manifest, validated: IntegrityError when it does not parse,
        ManifestInvalid (an IntegrityError) when it parses but is malformed."""
        raw = self.manifest_blob(snap_id)
        try:
            data = json.loads(self.codec.unseal(snap_id, raw))
        except ValueError:
            raise IntegrityError(f"manifest of snapshot {snap_id} is unreadable (truncated?)") from None
        try:
            manifest = Manifest.from_json(data)
        except ManifestInvalid as exc:
            raise ManifestInvalid(f"manifest of snapshot {snap_id} is invalid: {exc.message}",
                                  hint=exc.hint) from None
        if manifest.id != snap_id:
            raise ManifestInvalid(f"manifest of snapshot {snap_id} names itself {manifest.id}")
        return manifest

    def scan(self) -> tuple[list[Manifest], dict[str, IntegrityError]]:
        """Every manifest that loads (oldest first), and why each other one does not."""
        good, bad = [], {}
        for sid in self.snapshot_ids():
            try:
                good.append(self.load(sid))
            except IntegrityError as exc:
                bad[sid] = exc
        return sorted(good, key=lambda m: m.created), bad

    def manifests(self) -> list[Manifest]:
        """The manifests that load, oldest first (scan() also says which do not)."""
        return self.scan()[0]

    def resolve(self, ref: str) -> str:
        """Snapshot id from an id, a unique id prefix, or a name (newest of that name)."""
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

    # ---- materialise (restore side) ---------------------------------------------------
    def materialise(self, manifest: Manifest, dest: str, progress: Progress | None = None,
                    *, which: str = "files", only: dict | None = None) -> None:
        """Write a snapshot's files (which: "files" or "logs") under dest, verifying each
        chunk as it is decoded (materialise.py says how). Zero chunks are left as holes.
        only: per path, the byte ranges to write (the rest stays a hole: the uffd page
        path places those pages itself). Any mismatch raises IntegrityError; the caller
        removes dest. Statistics in self.last_materialise."""
        self.last_materialise = materialise.write_files(self, getattr(manifest, which), dest,
                                                        _threads(), progress, only)

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
        _mode, results = parallel.run(_verify_batch, (self, batches), len(batches), _threads(),
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
            path = os.path.join(self.snapshots_dir, sid + ".json")
            try:
                os.unlink(path)
                removed.append(sid)
            except FileNotFoundError:
                raise SnapshotNotFound(f"no snapshot {sid}") from None
        fsutil.fsync_dir(self.snapshots_dir)
        return removed

    def gc_plan(self) -> dict:
        """Chunks no manifest references, and stale temp files. Pure reading. Refuses
        (IntegrityError) while a manifest does not load: which chunks it needs is unknown."""
        live: set[str] = set()
        good, bad = self.scan()
        if bad:
            sid, exc = next(iter(bad.items()))
            exc.hint = (f"gc deletes nothing while a manifest cannot be read ({len(bad)} now): "
                        f"put back a good copy of snapshots/{sid}.json, or `gpusnap rm {sid}`")
            raise exc
        for m in good:
            live.update(m.chunk_sizes())
        dead, dead_bytes = [], 0
        for sub in os.listdir(self.chunks_dir):
            for cid in os.listdir(os.path.join(self.chunks_dir, sub)):
                if cid not in live:
                    path = os.path.join(self.chunks_dir, sub, cid)
                    dead.append(path)
                    dead_bytes += os.path.getsize(path)
        # Only files: a directory here is a dump or restore work dir (when /dev/shm is
        # unusable) that a restore may still be reading after it dropped its lock.
        temps = [p for p in (os.path.join(self.tmp_dir, n) for n in os.listdir(self.tmp_dir))
                 if os.path.isfile(p) and not os.path.islink(p)]
        return {"chunks": dead, "bytes": dead_bytes, "temps": temps}

    def gc_execute(self, plan: dict) -> None:
        for path in plan["chunks"] + plan["temps"]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
