"""One snapshot as one self-describing file, to carry between stores (export / import).

    ARCHIVE ::= ustar/pax tar, members in this order, each a regular file:
      gpusnap-archive.json   HEADER (JSON, at most 16 MiB)
      manifest.json          the snapshot's manifest, as the store holds it
      chunks/<id>            one per distinct non-zero chunk the manifest names: the
                             stored bytes as they are (a zstd frame of the plain bytes;
                             from an encrypted store, nonce || AES-256-GCM of that frame)
    HEADER ::= {"format": "gpusnap-archive", "version": 1, "snapshot": <id>,
                "hash": "sha256", "codec": "zstd", "bytes": <sum of chunk sizes>,
                "chunks": {<id>: <stored size>, ...}, "gpusnap_version": <str>}
               from an encrypted store also: "hash": "hmac-sha256", "encryption":
               "aes-256-gcm", "kdf": "hkdf-sha256", "key_check": <hex>, and manifest.json
               is the sealed manifest as the store holds it (codec.py)

An archive keeps the encoding of the store it came from: export never decrypts. An
encrypted archive imports only into a store encrypted with the same key (same key_check:
else WrongKey), a plain archive only into a plain store (else ArchiveError).

Import trusts nothing in the file: only the three kinds of names above, regular files
only (no links, devices, directories), each name once, every chunk member exactly the
size the header declared and the header's total under a limit, the manifest validated
as every load validates it (model.Manifest.from_json), every chunk decompressed
(bounded by its plain size in the manifest) and re-hashed before it enters the store.
The manifest is committed last, its chunks durable, exactly as a dump commits: an import cut
short leaves at most unreferenced chunks for gc. Importing a snapshot the store already
holds (same id, same manifest) is a no-op; the same id with another manifest is refused.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import io
from dataclasses import dataclass
from typing import BinaryIO

from .. import VERSION
from ..errors import ArchiveError, IntegrityError, ManifestInvalid, WrongKey
from ..model import Manifest
from ..model.manifest import MAX_CHUNK_BYTES
from . import codec, fsutil
from .repository import Repository

FORMAT = "gpusnap-archive"
VERSION_1 = 1
HEADER_NAME = "gpusnap-archive.json"
MANIFEST_NAME = "manifest.json"
CHUNK_PREFIX = "chunks/"
MAX_META_BYTES = 16 << 20           # header and manifest
MAX_CHUNK_PLAIN = MAX_CHUNK_BYTES    # a chunk's plain size as the manifest claims it
DEFAULT_MAX_BYTES = 1 << 40         # all chunk members together

_CHUNK_ID = re.compile(r"^[0-9a-f]{64}$")
_SNAP_ID = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")


@dataclass
class ImportResult:
    id: str
    chunks_imported: int
    chunks_present: int
    bytes_imported: int
    already_present: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ---- export ------------------------------------------------------------------------------

def export(repo: Repository, snap_id: str, out: BinaryIO) -> dict:
    """Write snapshot snap_id as an archive to out (a writable binary stream).

    The caller holds the shared lock, so gc cannot take a chunk away mid-export.
    """
    manifest_bytes = repo.manifest_blob(snap_id)
    manifest = repo.load(snap_id)
    sizes = {}
    for cid in sorted(Repository.chunk_sizes(manifest)):
        sizes[cid] = repo.stored_size(cid)
        if sizes[cid] is None:
            raise IntegrityError(f"chunk {cid[:16]} of snapshot {snap_id} is missing from the store")
    header = {"format": FORMAT, "version": VERSION_1, "snapshot": snap_id,
              **repo.codec.describe(), "chunks": sizes, "bytes": sum(sizes.values()),
              "gpusnap_version": VERSION}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, HEADER_NAME, json.dumps(header, sort_keys=True).encode())
        _add(tar, MANIFEST_NAME, manifest_bytes)
        for cid in sizes:
            blob = repo.read_blob(cid)
            if len(blob) != sizes[cid]:
                raise IntegrityError(f"chunk {cid[:16]} changed size during export")
            _add(tar, CHUNK_PREFIX + cid, blob)
    return {"id": snap_id, "chunks": len(sizes), "bytes": header["bytes"]}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


# ---- import ------------------------------------------------------------------------------

def import_(repo: Repository, src: BinaryIO, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ImportResult:
    """Read an archive from src (a stream; read once, front to back) into repo.

    The caller holds the shared lock (as a dump does): chunks first, manifest last.
    """
    try:
        tar = tarfile.open(fileobj=src, mode="r|")
    except tarfile.TarError as exc:
        raise ArchiveError(f"not a gpusnap archive: {exc}") from None
    run = _Import(repo, tar, max_bytes)
    try:
        for member in tar:
            run.take(member)
    except tarfile.TarError as exc:
        raise ArchiveError(f"the archive is damaged: {exc}") from None
    finally:
        tar.close()
    return run.commit()


class _Import:
    """One archive being read, member by member: the header, the manifest, the chunks."""

    def __init__(self, repo: Repository, tar: tarfile.TarFile, max_bytes: int):
        self.repo, self.tar, self.max_bytes = repo, tar, max_bytes
        self.header: dict | None = None
        self.manifest: Manifest | None = None
        self.sizes: dict[str, int] = {}         # chunk id -> stored size (the header's)
        self.plain: dict[str, int] = {}         # chunk id -> plain size (the manifest's)
        self.seen: set[str] = set()
        self.imported = self.present = self.imported_bytes = self.total = 0

    def take(self, member: tarfile.TarInfo) -> None:
        name = _check_member(member, self.seen)
        if self.header is None:
            if name != HEADER_NAME:
                raise ArchiveError(f"the archive must start with {HEADER_NAME}, not {name}")
            self.header = _check_header(_json_member(self.tar, member), self.max_bytes, self.repo)
            self.sizes = self.header["chunks"]
        elif self.manifest is None:
            if name != MANIFEST_NAME:
                raise ArchiveError(f"{MANIFEST_NAME} must follow the header, not {name}")
            snap_id = self.header["snapshot"]
            self.manifest = _check_manifest(_json_member(
                self.tar, member, lambda raw: self.repo.codec.unseal(snap_id, raw)),
                self.header, self.sizes)
            self.plain = self.manifest.chunk_sizes()
        elif name.startswith(CHUNK_PREFIX):
            self._chunk(member, name[len(CHUNK_PREFIX):])
        else:
            raise ArchiveError(f"unexpected member {name}")

    def _chunk(self, member: tarfile.TarInfo, cid: str) -> None:
        sizes, repo = self.sizes, self.repo
        if cid not in sizes:
            raise ArchiveError(f"chunk {cid[:16]} is not declared in the header")
        if member.size != sizes[cid]:
            raise ArchiveError(f"chunk {cid[:16]} is {member.size} bytes, the header declared {sizes[cid]}")
        self.total += member.size
        if self.total > self.max_bytes:
            raise ArchiveError(f"the archive holds more than {self.max_bytes} bytes of chunks")
        blob = _read_member(self.tar, member)
        if repo.has_chunk(cid):
            self.present += 1
            repo.codec.decode(blob, cid, self.plain[cid])      # still verify what we were given
            return
        repo.codec.decode(blob, cid, self.plain[cid])          # raises IntegrityError on mismatch
        repo.store_blob(cid, blob)
        self.imported += 1
        self.imported_bytes += len(blob)

    def commit(self) -> ImportResult:
        """Every chunk is in: the manifest goes in last (or is found there already)."""
        repo, manifest = self.repo, self.manifest
        if self.header is None or manifest is None:
            raise ArchiveError("the archive has no header or no manifest")
        arrived = {n[len(CHUNK_PREFIX):] for n in self.seen if n.startswith(CHUNK_PREFIX)}
        if arrived != set(self.plain):
            raise ArchiveError(f"{len(set(self.plain) - arrived)} chunks the manifest needs are "
                               f"missing from the archive")
        snap_id = manifest.id
        counts = (self.imported, self.present, self.imported_bytes)
        if snap_id in repo.snapshot_ids():
            try:
                same = _local_fields_dropped(repo.load(snap_id)) == _local_fields_dropped(manifest)
            except IntegrityError:
                same = False
            if not same:
                raise ArchiveError(f"the store already holds a different snapshot with id {snap_id}")
            return ImportResult(snap_id, *counts, already_present=True)
        repo.commit(manifest)
        return ImportResult(snap_id, *counts, already_present=False)


def _check_member(member: tarfile.TarInfo, seen: set[str]) -> str:
    name = member.name
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        raise ArchiveError(f"unsafe path in the archive: {name!r}")
    if not member.isreg():
        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "non-regular member"
        raise ArchiveError(f"{kind} {name!r} in the archive: only regular files are allowed")
    if name not in (HEADER_NAME, MANIFEST_NAME) and not (
            name.startswith(CHUNK_PREFIX) and _CHUNK_ID.match(name[len(CHUNK_PREFIX):])):
        raise ArchiveError(f"unexpected member {name!r} in the archive")
    if name in seen:
        raise ArchiveError(f"{name!r} appears twice in the archive")
    seen.add(name)
    return name


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    data = f.read(member.size + 1) if f else b""
    if len(data) != member.size:
        raise ArchiveError(f"{member.name} is truncated")
    return data


def _json_member(tar: tarfile.TarFile, member: tarfile.TarInfo, unseal=None):
    if member.size > MAX_META_BYTES:
        raise ArchiveError(f"{member.name} claims {member.size} bytes (limit {MAX_META_BYTES})")
    raw = _read_member(tar, member)
    try:
        return json.loads(unseal(raw) if unseal else raw)
    except ValueError:
        raise ArchiveError(f"{member.name} is not valid JSON") from None


def _check_header(h, max_bytes: int, repo: Repository) -> dict:
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise ArchiveError("not a gpusnap archive (bad header)")
    if h.get("version") != VERSION_1:
        raise ArchiveError(f"archive version {h.get('version')} is not supported (this gpusnap: {VERSION_1})")
    mine = repo.codec.describe()
    if h.get("encryption") != mine.get("encryption"):
        raise ArchiveError(f"the archive is {h.get('encryption') or 'not encrypted'}, the store "
                           f"{mine.get('encryption') or 'not encrypted'}: an archive imports only "
                           f"into a store of its own kind (restore and dump again to convert)")
    if mine.get("encryption") and h.get("key_check") != mine["key_check"]:
        raise WrongKey("the archive was made with another key than this store's")
    if h.get("hash") != mine["hash"] or h.get("codec") != mine["codec"]:
        raise ArchiveError(f"archive uses {h.get('hash')}/{h.get('codec')}, this store "
                           f"{mine['hash']}/{mine['codec']}")
    chunks = h.get("chunks")
    if not isinstance(chunks, dict) or not all(
            isinstance(k, str) and _CHUNK_ID.match(k) and isinstance(v, int) and 0 < v <= MAX_CHUNK_PLAIN * 2
            for k, v in chunks.items()):
        raise ArchiveError("the archive header's chunk list is malformed")
    if sum(chunks.values()) > max_bytes:
        raise ArchiveError(f"the archive declares {sum(chunks.values())} bytes of chunks, over the "
                           f"limit of {max_bytes}")
    if not isinstance(h.get("snapshot"), str) or not _SNAP_ID.match(h["snapshot"]):
        raise ArchiveError("the archive header names no valid snapshot id")
    return h


def _check_manifest(data, header: dict, sizes: dict[str, int]) -> Manifest:
    """The archive's manifest, validated as the store validates every manifest it loads
    (model.manifest: paths, sizes, chunk ids and lengths), and matching the header."""
    try:
        m = Manifest.from_json(data)
    except ManifestInvalid as exc:
        raise ArchiveError(f"the archive's manifest is invalid: {exc.message}") from None
    if m.id != header["snapshot"]:
        raise ArchiveError("the manifest does not belong to the snapshot the header names")
    if set(sizes) != set(m.chunk_sizes()):
        raise ArchiveError("the header's chunk list and the manifest's chunks differ")
    return m


def _local_fields_dropped(m: Manifest) -> dict:
    """A manifest's JSON without what each store sets for itself (its commit sequence)."""
    return {k: v for k, v in m.to_json().items() if k != "seq"}


def export_to_path(repo: Repository, snap_id: str, path: str) -> dict:
    """export() into path atomically (temp name, fsync, rename): no half archive is left."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb") as f:
            result = export(repo, snap_id, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        fsutil.raise_os_error(exc, path)
    except BaseException:
        _unlink(tmp)
        raise
    return result


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
