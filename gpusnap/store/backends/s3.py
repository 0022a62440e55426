"""A store in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, R2, GCS interop), by botocore.

    s3://BUCKET/PREFIX  ->  objects PREFIX/config, PREFIX/packs/<xx>/<id>, PREFIX/index/<id>,
                            PREFIX/snapshots/<id>.json, PREFIX/locks/<id>, PREFIX/seq/<n>

Repository names chunks as in a local store (chunks/<xx>/<id>); here they live in pack
files, several MiB each, with an index object a pack (packs.py: the format and why). A
chunk exists once an index naming it is visible; refresh("chunks/") lists index/ and
loads the indexes not seen before (cached on the node, as they never change).

Endpoint, region and credentials come the way of every AWS tool: AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3), AWS_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE
and ~/.aws/config. Transfers run on a thread pool (GPUSNAP_S3_CONCURRENCY, default 16).
Throttling (503 SlowDown) and dropped connections are retried with exponential backoff by
botocore's standard retry mode (GPUSNAP_S3_RETRIES attempts, default 8).

Reads of chunks go through the node's pull-through cache (store/cache.py) when there is
one: a miss fetches the chunk's whole pack once (a lock file per pack in the cache keeps
the restore's other workers waiting for it rather than fetching it too) and keeps it
whole, its chunks read out of it by offset; the Repository tells this backend which
chunks it verified (verified()): one read by range is kept alone.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import os
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

from ...errors import StoreDenied, StoreError, StoreUnavailable
from .. import parallel
from . import packs, prefetch
from .base import Backend, Missing, chunk_name

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
SEQ = "seq/"                # claims of commit sequence numbers (next_seq)
CONFIG = "config"           # written once (put if_absent), never replaced


def parse_url(url: str) -> tuple[str, str]:
    """s3://BUCKET/PREFIX -> (bucket, 'PREFIX/' or '')."""
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreError(f"no bucket in {url}", hint="--store s3://BUCKET/PREFIX")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


_client_lock = threading.Lock()


_sessions: dict[tuple, object] = {}


def _new_client(config):
    """An S3 client from the process tree's botocore session for the AWS_* variables now
    (one session a set): a client made from a session that made one before (a forked
    worker's, from its parent's) takes ~8 ms instead of ~60 (the service model and
    credentials are loaded once). botocore alone: boto3 would add ~15 ms of imports and
    ~15 ms to a first client for nothing used here. Once a session made its first client,
    what is in memory then goes out of the collector's sight (gc.freeze): a forked
    worker's first full collection would walk it all, ~20 ms a worker on a 2-core host.
    Use under _client_lock."""
    import botocore.session
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    made = key in _sessions
    if not made:
        _sessions[key] = botocore.session.Session()
    client = _sessions[key].create_client("s3", config=config)
    if not made:
        gc.freeze()
    return client


def _concurrency() -> int:
    value = os.environ.get("GPUSNAP_S3_CONCURRENCY", "16")
    return max(1, int(value)) if value.isdigit() else 16


class S3Backend(Backend):
    batches_puts = True
    LIST_PAGE = 1000                        # keys a LIST answers at most (S3's own limit)

    def __init__(self, url: str, cache=None):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_url(self.url)
        self.cache = cache                  # a ChunkCache, or None
        self._pid = None
        self._client = None
        self._index: dict[str, int] | None = None      # sizes of other objects, by refresh()
        self._index_lock = threading.Lock()
        self._claimed: dict[str, int] = {}
        self._table = packs.PackTable()
        self._table_loaded = False
        self._cache_full = False
        self.bad_indexes: dict[str, str] = {}           # pack id -> why its index was refused
        self._bundled: dict[str, packs.Pack] = {}       # pack id -> its index, from a bundle
        self._bundles: dict[str, set[str]] = {}         # bundle id -> the packs it holds
        self._config: bytes | None = None               # the config, as check_bucket read it
        self._served: set[str] = set()                  # chunks the cache served, not verified yet

    # ---- plumbing --------------------------------------------------------------------
    def client(self):
        """This process's client (one per process: a forked worker makes its own)."""
        with _client_lock:
            if self._pid != os.getpid():
                self._connect()
        return self._client

    def _connect(self) -> None:
        from botocore.config import Config
        retries = os.environ.get("GPUSNAP_S3_RETRIES", "8")
        config = Config(retries={"mode": "standard",
                                 "max_attempts": int(retries) if retries.isdigit() else 8},
                        max_pool_connections=_concurrency() + 4,
                        connect_timeout=5, read_timeout=60)
        self._client = _new_client(config)
        self._pid = os.getpid()

    @staticmethod
    def _pool(n: int) -> ThreadPoolExecutor:
        """Threads for one batch of transfers, gone when it is done (a thread left running
        would stop the store's worker processes from forking: parallel.py)."""
        return ThreadPoolExecutor(min(n, _concurrency()), thread_name_prefix="gpusnap-s3")

    def key(self, name: str) -> str:
        return self.prefix + name

    def _call(self, op: str, name: str, read: bool = False, **kw):
        """One S3 call, its failures turned into gpusnap's errors (Missing for 404); with
        read, the body of its answer, read within the same mapping."""
        import botocore.exceptions as bx
        try:
            out = getattr(self.client(), op)(Bucket=self.bucket, **kw)
            return out["Body"].read() if read else out
        except bx.ClientError as exc:
            raise translate(exc, self.url, name) from None
        except (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
                bx.ConnectTimeoutError, bx.ResponseStreamingError, bx.IncompleteReadError) as exc:
            raise StoreUnavailable(f"object store {self.url} did not answer: {exc}",
                                   hint="check AWS_ENDPOINT_URL and that the server runs; "
                                        "a retry resumes (stored chunks are not sent again)") from None
        except bx.NoCredentialsError:
            raise StoreDenied(f"no credentials for {self.url}",
                              hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
        except bx.BotoCoreError as exc:
            raise StoreUnavailable(f"object store {self.url}: {exc}") from None

    # ---- objects ---------------------------------------------------------------------
    def _body(self, name: str, **kw) -> bytes:
        """GET of an object's body (or of a range of it), read inside the error mapping:
        a connection dropped mid-body is StoreUnavailable too."""
        return self._call("get_object", name, read=True, Key=self.key(name), **kw)

    def get(self, name: str) -> bytes:
        cid = packs.chunk_id_of(name)
        if name == CONFIG and self._config is not None:
            return self._config
        if cid is None:
            return self._body(name)
        return self._read_chunk(name, cid)

    def get_many(self, names: list[str]) -> Iterator[bytes]:
        """get() of each, in order: chunks the cache holds at once, the others fetched
        concurrently (no thread is started when the cache holds all but one)."""
        hits = [self._cached(n) for n in names]
        missing = [n for n, hit in zip(names, hits) if hit is None]
        if len(missing) < 2:
            yield from (self.get(n) if hit is None else hit for n, hit in zip(names, hits))
            return
        with self._pool(len(missing)) as pool:
            futures = iter([pool.submit(self.get, n) for n in missing])
            try:
                for hit in hits:
                    yield next(futures).result() if hit is None else hit
            finally:
                for f in futures:
                    f.cancel()

    def _cached(self, name: str) -> bytes | None:
        cid = packs.chunk_id_of(name) if self.cache is not None else None
        return self._from_cache(cid) if cid else None

    def _from_cache(self, cid: str) -> bytes | None:
        """A chunk's stored bytes from the cache: out of a kept pack that holds it, or
        kept alone. Noted as served from the cache: verified() has nothing to keep."""
        for pack, off, n in self._holders(cid):
            hit = self.cache.get_range(pack.id, off, n)
            if hit is not None:
                break
        else:
            hit = self.cache.get(cid)
        if hit is not None:
            self._served.add(cid)
        return hit

    def reread(self, name: str) -> bytes | None:
        """A chunk whose stored bytes failed their check: its copies in the cache go (kept
        alone, and the packs that hold it), and its bytes come from the store, by range.
        None where there is no cache (they came from the store already)."""
        cid = packs.chunk_id_of(name)
        if cid is None or self.cache is None:
            return None
        self.cache.drop(cid)
        holders = self._holders(cid)
        for pack, _off, _n in holders:
            self.cache.drop_pack(pack.id)
        if not holders:
            return None
        return self._range(*holders[0])

    def in_cache(self, cid: str) -> bool:
        """Whether the cache holds chunk cid: alone, or in a kept pack."""
        return self.cache.has(cid) or any(self.cache.has_pack(p.id) for p, _o, _n in self._holders(cid))

    def _holders(self, cid: str) -> list[tuple[packs.Pack, int, int]]:
        """Where the loaded table has chunk cid: (pack, offset, length) of each pack."""
        if not self._table_loaded:
            return []
        with self._index_lock:
            return self._table.holders(cid)

    def put(self, name: str, data, *, durable: bool = True, if_absent: bool = False) -> bool:
        cid = packs.chunk_id_of(name)
        if cid is not None:
            if if_absent:
                self.refresh("chunks/")
                if self.size(name) is not None:
                    return False
            self._put_pack([(cid, data)])
            return True
        if name == CONFIG:
            self._config = None
        kw = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._call("put_object", name, Key=self.key(name), Body=bytes(data), **kw)
        except StoreError as exc:
            if if_absent and "PreconditionFailed" in exc.message:
                return False
            raise
        self._note(name, len(data))
        return True

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Chunks go into packs (about PACK_BYTES each, uploaded at once), other objects
        one by one."""
        chunks, jobs = [], []
        for name, data in items:
            cid = packs.chunk_id_of(name)
            if cid is None:
                jobs.append(functools.partial(self.put, name, data, durable=False))
            else:
                chunks.append((cid, data))
        jobs += [functools.partial(self._put_pack, group)
                 for group in parallel.batches(chunks, lambda c: len(c[1]), packs.PACK_BYTES)]
        if len(jobs) <= 1:
            for job in jobs:
                job()
            return
        with self._pool(len(jobs)) as pool:
            for f in [pool.submit(job) for job in jobs]:
                f.result()

    def _put_pack(self, blobs: list[tuple[str, bytes]]) -> None:
        """Upload one pack, then its index: its chunks exist from then on."""
        data, pack, index = packs.build((cid, bytes(blob)) for cid, blob in blobs)
        self._call("put_object", packs.pack_name(pack.id), Key=self.key(packs.pack_name(pack.id)),
                   Body=data)
        self._call("put_object", packs.index_name(pack.id),
                   Key=self.key(packs.index_name(pack.id)), Body=index)
        with self._index_lock:
            self._table.add(pack)
        if self.cache is not None:          # made here: as good as verified
            self.cache.put_index(pack.id, index)
            self.cache.put_pack(pack.id, data)

    def claim(self, name: str, size: int) -> int | None:
        with self._index_lock:
            first = self._claimed.get(name)
            if first is None:
                self._claimed[name] = size
            return first

    def size(self, name: str) -> int | None:
        cid = packs.chunk_id_of(name)
        if cid is not None:
            self._loaded()
            with self._index_lock:
                return self._table.size(cid)
        if name == CONFIG and self._config is not None:
            return len(self._config)
        with self._index_lock:
            if self._index is not None and name in self._index:
                return self._index[name]
        try:
            return self._call("head_object", name, Key=self.key(name))["ContentLength"]
        except Missing:
            return None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Objects under prefix; under chunks/, the chunks of every pack (each once)."""
        if prefix.startswith("chunks/"):
            self.refresh("chunks/")
            with self._index_lock:
                listing = list(self._table.chunks())
            for cid, size in listing:
                name = chunk_name(cid)
                if name.startswith(prefix):
                    yield name, size
            return
        for name, size, _mtime in self.list_meta(prefix):
            yield name, size

    def list_meta(self, prefix: str) -> Iterator[tuple[str, int, object]]:
        """(name, size, last modified by the server's clock) under prefix, a page of up to
        LIST_PAGE at a time (a loop of its own: botocore's paginator loads a model first,
        ~8 ms of the first listing of every process)."""
        kw = {"Prefix": self.key(prefix), "MaxKeys": self.LIST_PAGE}
        while True:
            page = self._call("list_objects_v2", prefix, **kw)
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix):], obj["Size"], obj["LastModified"]
            if not page.get("IsTruncated"):
                return
            kw["ContinuationToken"] = page["NextContinuationToken"]

    def delete(self, name: str) -> None:
        if self.size(name) is None:
            raise Missing(name)
        if packs.chunk_id_of(name) is not None:
            self.delete_many([name])
            return
        self._call("delete_object", name, Key=self.key(name))
        self._note(name, None)

    def delete_many(self, names: Iterable[str]) -> None:
        """Chunk names: the packs every chunk of which is among them go (a pack that holds
        another chunk stays whole). Index objects go before the packs they name."""
        names = list(names)
        dead = {n: 0 for n in names if packs.chunk_id_of(n) is not None}
        others = [n for n in names if n not in dead]
        if dead:
            others += self.reclaim(dead)[1]
        self._delete_objects([n for n in others if n.startswith(packs.INDEX)])
        self._delete_objects([n for n in others if not n.startswith(packs.INDEX)])

    def _delete_objects(self, names: list[str]) -> None:
        for i in range(0, len(names), 1000):        # DeleteObjects takes 1000 at most
            part = names[i:i + 1000]
            out = self._call("delete_objects", part[0], Delete={
                "Objects": [{"Key": self.key(n)} for n in part], "Quiet": True})
            if out.get("Errors"):
                e = out["Errors"][0]
                raise StoreError(f"could not delete {len(out['Errors'])} objects from {self.url}: "
                                 f"{e.get('Code')} {e.get('Message')}")
            for n in part:
                self._note(n, None)

    def reclaim(self, dead: dict[str, int]) -> tuple[list[str], list[str], int]:
        """Of the dead chunks, those whose every pack is dead; the packs' objects."""
        table = self._loaded()
        with self._index_lock:
            freed, gone, nbytes = table.reclaim(
                {cid for cid in map(packs.chunk_id_of, dead) if cid is not None})
        objects = [packs.index_name(p) for p in gone] + [packs.pack_name(p) for p in gone]
        return [chunk_name(c) for c in freed], objects, nbytes

    def refresh(self, prefix: str) -> None:
        if prefix.startswith("chunks/"):
            self._refresh_packs()
            return
        listing = {name: size for name, size in self.list(prefix)}
        with self._index_lock:
            if self._index is None:
                self._index = {}
            for name in [n for n in self._index if n.startswith(prefix)]:
                del self._index[name]
            self._index.update(listing)

    def _note(self, name: str, size: int | None) -> None:
        if name == CONFIG:
            self._config = None
        with self._index_lock:
            if name.startswith(packs.INDEX) and size is None:
                self._table.drop(name[len(packs.INDEX):])
                if self.cache is not None:
                    self.cache.drop_index(name[len(packs.INDEX):])
            if name.startswith(packs.BUNDLES) and size is None:
                self._bundles.pop(name[len(packs.BUNDLES):], None)
            if self._index is not None:
                if size is None:
                    self._index.pop(name, None)
                else:
                    self._index[name] = size

    def verified(self, name: str, blob) -> None:
        """A chunk's stored bytes that a decode just checked: keep them in the cache
        (where no kept pack holds them already)."""
        cid = packs.chunk_id_of(name) if self.cache is not None else None
        if not cid or cid in self._served:
            self._served.discard(cid)
            return
        if not self.in_cache(cid):
            self.cache.put(cid, blob)

    def prepare_reads(self, names: list[str] | None = None) -> None:
        """A restore asks three times (the prefetch, materialise, the fill) for the same
        chunks: the listing of index/ (and its decode) is taken once, while every chunk
        named is in the table loaded. A chunk read that the table lacks lists again
        (_read_chunk), as before."""
        if names is not None and self._table_loaded:
            with self._index_lock:
                if all(cid and self._table.locate(cid) for cid in map(packs.chunk_id_of, names)):
                    return
        self.refresh("chunks/")

    # ---- packs: the index, and reads ------------------------------------------------------
    def _loaded(self) -> packs.PackTable:
        """The pack table, loaded by a first refresh when nothing loaded it yet (use it
        under _index_lock; never call this holding it)."""
        if not self._table_loaded:
            self.refresh("chunks/")
        return self._table

    def _refresh_packs(self) -> None:
        """List index/, load the index objects not known yet (from the cache, else from
        the store, concurrently), forget packs whose index is gone."""
        with self._index_lock:
            known = set(self._table.packs)
        listed = {}
        for name, size in self.list(packs.INDEX):
            pid = name[len(packs.INDEX):]
            if packs.is_id(pid):
                listed[pid] = size
        new = [pid for pid in listed if pid not in known]
        loaded = self._load_indexes(new, listed)
        with self._index_lock:
            for pid in known - set(listed):
                self._table.drop(pid)
            for pack in loaded:
                self._table.add(pack)
            self._claimed = {}              # what is stored now is in the table
            self._table_loaded = True

    def _load_indexes(self, ids: list[str], sizes: dict[str, int]) -> list[packs.Pack]:
        """The indexes of packs ids: from the cache, else from bundles (when many are
        missing), else each from its index object, 16 at a time."""
        found = [p for p in map(self._cached_index, ids) if p]
        rest = [pid for pid in ids if pid not in {p.id for p in found}]
        if len(rest) >= packs.MIN_BUNDLE:
            self._load_bundles()
            with self._index_lock:
                found += [self._bundled[pid] for pid in rest if pid in self._bundled]
            rest = [pid for pid in rest if pid not in self._bundled]
        if len(rest) < 2:
            return found + [p for p in (self._fetch_index(i, sizes[i]) for i in rest) if p]
        with self._pool(len(rest)) as pool:
            return found + [p for p in pool.map(lambda i: self._fetch_index(i, sizes[i]), rest) if p]

    def _cached_index(self, pack_id: str) -> packs.Pack | None:
        raw = self.cache.get_index(pack_id) if self.cache is not None else None
        if raw is not None:
            with contextlib.suppress(packs.BadIndex):
                return packs.decode_index(pack_id, raw)
        return None

    def _fetch_index(self, pack_id: str, size: int) -> packs.Pack | None:
        """One pack's index object, validated; None (and the reason in bad_indexes) when
        it is not a valid index: its chunks stay unknown."""
        try:
            if size > packs.MAX_INDEX_BYTES:
                raise packs.BadIndex(f"index of pack {pack_id[:16]} is {size} bytes")
            raw = self._body(packs.index_name(pack_id))
            pack = packs.decode_index(pack_id, raw)
        except packs.BadIndex as exc:
            self.bad_indexes[pack_id] = str(exc)
            return None
        except Missing:                     # deleted since the listing
            return None
        if self.cache is not None:
            self.cache.put_index(pack_id, raw)
        return pack

    def _load_bundles(self) -> None:
        """Read the bundles not read yet (from the cache, else the store)."""
        with self._index_lock:
            seen = set(self._bundles)
        ids = [n[len(packs.BUNDLES):] for n, _s in self.list(packs.BUNDLES)]
        ids = [i for i in ids if packs.is_id(i) and i not in seen]
        if not ids:
            return
        with self._pool(len(ids)) as pool:
            loaded = list(pool.map(self._bundle, ids))
        with self._index_lock:
            for bundle_id, got in zip(ids, loaded):
                self._bundles[bundle_id] = {p.id for p in got}
                for pack in got:
                    self._bundled.setdefault(pack.id, pack)

    def _bundle(self, bundle_id: str) -> list[packs.Pack]:
        """A bundle's packs; none when it does not match its id or is not a bundle."""
        key = f"bundle-{bundle_id}"
        raw = self.cache.get_index(key) if self.cache is not None else None
        try:
            if raw is None:
                raw = self._body(packs.BUNDLES + bundle_id)
            if hashlib.sha256(raw).hexdigest() != bundle_id:
                raise packs.BadIndex(f"bundle {bundle_id[:16]} does not match its id")
            got = packs.decode_bundle(raw)
        except packs.BadIndex as exc:
            self.bad_indexes[key] = str(exc)
            return []
        except Missing:
            return []
        if self.cache is not None:
            self.cache.put_index(key, raw)
        return got

    def sync(self, names: Iterable[str] = ()) -> None:
        """A PUT is durable once it returned. What this adds (commit names a snapshot's
        chunks here): one bundle of the indexes of the packs holding them that no bundle
        holds yet, when there are MIN_BUNDLE or more, so a node loading the index reads
        one object for them."""
        table = self._loaded()
        self._load_bundles()
        with self._index_lock:
            new = {}
            for cid in filter(None, map(packs.chunk_id_of, names)):
                found = table.locate(cid)
                if found and found[0].id not in self._bundled:
                    new[found[0].id] = found[0]
        if len(new) < packs.MIN_BUNDLE:
            return
        bundle_id, raw = packs.encode_bundle(sorted(new.values(), key=lambda p: p.id))
        self._call("put_object", packs.BUNDLES + bundle_id,
                   Key=self.key(packs.BUNDLES + bundle_id), Body=raw)
        with self._index_lock:
            self._bundles[bundle_id] = set(new)
            self._bundled.update(new)
        if self.cache is not None:
            self.cache.put_index(f"bundle-{bundle_id}", raw)

    def _read_chunk(self, name: str, cid: str) -> bytes:
        """A chunk's stored bytes: from the cache, else with its whole pack (checked
        against the pack id, then kept in the cache whole), else by range."""
        table = self._loaded()
        if self.cache is not None:
            hit = self._from_cache(cid)
            if hit is not None:
                return hit
        with self._index_lock:
            found = table.locate(cid)
        if found is None:
            self.refresh("chunks/")         # written since the last look, by another node?
            with self._index_lock:
                found = self._table.locate(cid)
        if found is None:
            raise Missing(name)
        pack, off, n = found
        try:
            if self.cache is None or self._cache_full or \
                    pack.size > min(packs.RANGE_OVER, self.cache.max_bytes // 4):
                return self._range(pack, off, n)
            with self.cache.pack_lock(pack.id):
                hit = self.cache.get_range(pack.id, off, n)
                if hit is not None:         # another process fetched the pack meanwhile
                    return hit
                return self._fetch_pack(pack)[off:off + n]
        except Missing:
            raise Missing(name) from None

    def _range(self, pack: packs.Pack, off: int, n: int) -> bytes:
        """n bytes at off of a pack, by a range GET (none for an empty chunk)."""
        return self._body(packs.pack_name(pack.id), Range=f"bytes={off}-{off + n - 1}") if n else b""

    def prefetch(self, names: list[str]) -> prefetch.Prefetch | None:
        """Start fetching the packs that hold names into the cache, in the order of names,
        several at once, in a helper process (prefetch.py); None when there is no cache or
        nothing to fetch. Up to half the cache's size; packs read by range are left out."""
        if self.cache is None or self._cache_full:
            return None
        self.prepare_reads(names)
        table = self._table
        whole = min(packs.RANGE_OVER, self.cache.max_bytes // 4)

        def pack_of(name: str):
            cid = packs.chunk_id_of(name)
            found = table.locate(cid) if cid else None
            return found[0] if found else None

        def wanted(pack, name: str) -> bool:
            return pack.size <= whole and not self.in_cache(packs.chunk_id_of(name))

        ahead = prefetch.order(names, pack_of, wanted, self.cache.max_bytes // 2)
        return prefetch.start(self._prefetch_pack, ahead, _concurrency())

    def _prefetch_pack(self, pack: packs.Pack) -> None:
        """In the prefetch helper: pack into the cache, unless a reader fetched it first."""
        with self.cache.pack_lock(pack.id):
            first = next(iter(pack.chunks), None)
            if not self.cache.has_pack(pack.id) and not (first and self.cache.has(first)):
                self._fetch_pack(pack)

    def _fetch_pack(self, pack: packs.Pack) -> bytes:
        """A whole pack; when it matches its id, into the cache (a disk that fills turns
        later reads into range GETs)."""
        data = self._body(packs.pack_name(pack.id))
        if len(data) == pack.size and hashlib.sha256(data).hexdigest() == pack.id:
            if not self.cache.put_pack(pack.id, data):
                self._cache_full = True
        return data

    def stale_temps(self) -> list[str]:
        """Expired lock objects, the sequence claims below the newest, packs without an
        index (a dump cut between the two PUTs) and indexes without their pack (gc runs
        under the exclusive lock: no commit is claiming, no dump is uploading)."""
        from .objlock import stale
        claims = sorted(self._seq_claims())
        return stale(self) + [f"{SEQ}{n:012d}" for n in claims[:-1]] + self._unpaired()

    def _unpaired(self) -> list[str]:
        """Indexes without their pack, packs without their index, bundles of packs none
        of which is left."""
        stored = {name.rsplit("/", 1)[-1]: name for name, _s in self.list(packs.PACKS)}
        indexed = {name[len(packs.INDEX):] for name, _s in self.list(packs.INDEX)}
        self._load_bundles()
        with self._index_lock:
            bundles = [b for b, held in self._bundles.items() if not held & indexed]
        return ([packs.index_name(p) for p in sorted(indexed - set(stored))]
                + [stored[p] for p in sorted(set(stored) - indexed)]
                + [packs.BUNDLES + b for b in sorted(bundles)])

    def next_seq(self, last_known: Callable[[], int]) -> int:
        """Claim the next number of the commit sequence: a create-only object seq/<n>
        (If-None-Match: *) holding a token of this claim, read back (a server whose
        conditional create is not atomic, like moto's check-then-put, lets the later of two
        racing puts win: the other sees a token not its own). A claim lost steps on to n+1,
        so two nodes committing at once never share a number."""
        n = max([last_known(), *self._seq_claims()]) + 1
        token = f"{socket.gethostname()} {os.getpid()} {secrets.token_hex(8)}".encode()
        for _ in range(1000):
            name = f"{SEQ}{n:012d}"
            if self.put(name, token, if_absent=True) and self._body(name) == token:
                return n
            n += 1
        raise StoreError(f"could not claim a commit sequence number in {self.url}")

    def _seq_claims(self) -> list[int]:
        return [int(name[len(SEQ):]) for name, _size in self.list(SEQ)
                if name[len(SEQ):].isdigit()]

    def lock(self, *, exclusive: bool, timeout: float):
        from .objlock import object_lock
        return object_lock(self, exclusive=exclusive, timeout=timeout)

    def check_bucket(self) -> None:
        """Fail early and clearly on a missing bucket or refused credentials, by reading
        the store's config: its GET says both (NoSuchBucket, a 403), and a NoSuchKey that
        the bucket holds no store yet. Opening the store then takes the config's
        existence and bytes from here: one request where a HEAD of the bucket, a HEAD and
        a GET of the config were three."""
        try:
            self._config = self._body(CONFIG)
        except Missing:
            self._config = None


def translate(exc, url: str, name: str) -> Exception:
    """A botocore ClientError as gpusnap's error (or Missing for an absent object)."""
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in _MISSING and name:
        return Missing(name)
    if code == "NoSuchBucket" or (code in _MISSING and not name):
        return StoreError(f"bucket of {url} does not exist",
                          hint="create it (e.g. `aws s3 mb`), or check --store and AWS_ENDPOINT_URL")
    if code in _DENIED or status == 403:
        return StoreDenied(f"object store refused access to {url} ({code})",
                           hint="check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                                "and the bucket's policy")
    if code in ("SlowDown", "ServiceUnavailable", "RequestTimeout", "InternalError") or \
            (status or 0) >= 500:
        return StoreUnavailable(f"object store {url} kept failing ({code}) after retries",
                                hint="the server is overloaded or down; retry later, or raise "
                                     "GPUSNAP_S3_RETRIES")
    return StoreError(f"object store {url}: {code} {err.get('Message', '')} ({name})".strip())
