"""A store in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, R2, GCS interop), by boto3.

    s3://BUCKET/PREFIX  ->  objects PREFIX/config, PREFIX/chunks/<xx>/<id>,
                            PREFIX/snapshots/<id>.json, PREFIX/locks/<id>, PREFIX/seq/<n>

the layout of a local store. Endpoint, region and credentials come the way of every AWS
tool: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), AWS_REGION, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws/config. One object per chunk (docs/design.md
says why not pack files); transfers run on a thread pool (GPUSNAP_S3_CONCURRENCY, default
16). Throttling (503 SlowDown) and dropped connections are retried with exponential
backoff by botocore's standard retry mode (GPUSNAP_S3_RETRIES attempts, default 8).

Reads of chunks go through the node's pull-through cache (store/cache.py) when there is
one; the Repository tells this backend which chunks it verified (verified()).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

from ...errors import StoreDenied, StoreError, StoreUnavailable
from .base import Backend, Missing

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
SEQ = "seq/"                # claims of commit sequence numbers (next_seq)


def parse_url(url: str) -> tuple[str, str]:
    """s3://BUCKET/PREFIX -> (bucket, 'PREFIX/' or '')."""
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreError(f"no bucket in {url}", hint="--store s3://BUCKET/PREFIX")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


_client_lock = threading.Lock()


def _concurrency() -> int:
    value = os.environ.get("GPUSNAP_S3_CONCURRENCY", "16")
    return max(1, int(value)) if value.isdigit() else 16


class S3Backend(Backend):
    batches_puts = True
    def __init__(self, url: str, cache=None):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_url(self.url)
        self.cache = cache                  # a ChunkCache, or None
        self._pid = None
        self._client = None
        self._index: dict[str, int] | None = None
        self._index_lock = threading.Lock()
        self._claimed: dict[str, int] = {}

    # ---- plumbing --------------------------------------------------------------------
    def client(self):
        """This process's client (one per process: a forked worker makes its own)."""
        with _client_lock:
            if self._pid != os.getpid():
                self._connect()
        return self._client

    def _connect(self) -> None:
        import boto3
        from botocore.config import Config
        retries = os.environ.get("GPUSNAP_S3_RETRIES", "8")
        config = Config(retries={"mode": "standard",
                                 "max_attempts": int(retries) if retries.isdigit() else 8},
                        max_pool_connections=_concurrency() + 4,
                        connect_timeout=5, read_timeout=60)
        self._client = boto3.session.Session().client("s3", config=config)
        self._pid = os.getpid()

    @staticmethod
    def _pool(n: int) -> ThreadPoolExecutor:
        """Threads for one batch of transfers, gone when it is done (a thread left running
        would stop the store's worker processes from forking: parallel.py)."""
        return ThreadPoolExecutor(min(n, _concurrency()), thread_name_prefix="gpusnap-s3")

    def key(self, name: str) -> str:
        return self.prefix + name

    def _call(self, op: str, name: str, **kw):
        """One S3 call, its failures turned into gpusnap's errors (Missing for 404)."""
        import botocore.exceptions as bx
        try:
            return getattr(self.client(), op)(Bucket=self.bucket, **kw)
        except bx.ClientError as exc:
            raise translate(exc, self.url, name) from None
        except (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
                bx.ConnectTimeoutError) as exc:
            raise StoreUnavailable(f"object store {self.url} did not answer: {exc}",
                                   hint="check AWS_ENDPOINT_URL and that the server runs; "
                                        "a retry resumes (stored chunks are not sent again)") from None
        except bx.NoCredentialsError:
            raise StoreDenied(f"no credentials for {self.url}",
                              hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
        except bx.BotoCoreError as exc:
            raise StoreUnavailable(f"object store {self.url}: {exc}") from None

    # ---- objects ---------------------------------------------------------------------
    def get(self, name: str) -> bytes:
        cid = self._cached_chunk(name)
        if cid:
            hit = self.cache.get(cid)
            if hit is not None:
                return hit
        return self._call("get_object", name, Key=self.key(name))["Body"].read()

    def get_many(self, names: list[str]) -> Iterator[bytes]:
        if len(names) < 2:
            yield from (self.get(n) for n in names)
            return
        with self._pool(len(names)) as pool:
            futures = [pool.submit(self.get, n) for n in names]
            try:
                for f in futures:
                    yield f.result()
            finally:
                for f in futures:
                    f.cancel()

    def put(self, name: str, data, *, durable: bool = True, if_absent: bool = False) -> bool:
        kw = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._call("put_object", name, Key=self.key(name), Body=bytes(data), **kw)
        except StoreError as exc:
            if if_absent and "PreconditionFailed" in exc.message:
                return False
            raise
        self._note(name, len(data))
        cid = self._cached_chunk(name)
        if cid:
            self.cache.put(cid, data)       # made here: as good as verified
        return True

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        if not items:
            return
        with self._pool(len(items)) as pool:
            for f in [pool.submit(self.put, n, d, durable=False) for n, d in items]:
                f.result()

    def claim(self, name: str, size: int) -> int | None:
        with self._index_lock:
            first = self._claimed.get(name)
            if first is None:
                self._claimed[name] = size
            return first

    def size(self, name: str) -> int | None:
        with self._index_lock:
            if self._index is not None and name in self._index:
                return self._index[name]
        try:
            return self._call("head_object", name, Key=self.key(name))["ContentLength"]
        except Missing:
            return None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        for name, size, _mtime in self.list_meta(prefix):
            yield name, size

    def list_meta(self, prefix: str) -> Iterator[tuple[str, int, object]]:
        """(name, size, last modified by the server's clock) under prefix."""
        import botocore.exceptions as bx
        paginator = self.client().get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key(prefix)):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix):], obj["Size"], obj["LastModified"]
        except bx.ClientError as exc:
            raise translate(exc, self.url, prefix) from None
        except (bx.BotoCoreError, OSError) as exc:
            raise StoreUnavailable(f"object store {self.url} did not answer: {exc}") from None

    def delete(self, name: str) -> None:
        if self.size(name) is None:
            raise Missing(name)
        self._call("delete_object", name, Key=self.key(name))
        self._note(name, None)

    def delete_many(self, names: Iterable[str]) -> None:
        names = list(names)
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

    def refresh(self, prefix: str) -> None:
        listing = {name: size for name, size in self.list(prefix)}
        with self._index_lock:
            self._claimed = {}              # what is stored now is in the listing
            if self._index is None:
                self._index = {}
            for name in [n for n in self._index if n.startswith(prefix)]:
                del self._index[name]
            self._index.update(listing)

    def _note(self, name: str, size: int | None) -> None:
        with self._index_lock:
            if self._index is not None:
                if size is None:
                    self._index.pop(name, None)
                else:
                    self._index[name] = size

    def _cached_chunk(self, name: str) -> str | None:
        if self.cache is not None and name.startswith("chunks/"):
            return name.rsplit("/", 1)[-1]
        return None

    def verified(self, name: str, blob) -> None:
        """A chunk's stored bytes that a decode just checked: keep them in the cache."""
        cid = self._cached_chunk(name)
        if cid and not self.cache.has(cid):
            self.cache.put(cid, blob)

    def stale_temps(self) -> list[str]:
        """Expired lock objects, and the sequence claims below the newest (gc runs under
        the exclusive lock: no commit is claiming meanwhile)."""
        from .objlock import stale
        claims = sorted(self._seq_claims())
        return stale(self) + [f"{SEQ}{n:012d}" for n in claims[:-1]]

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
            if self.put(name, token, if_absent=True) and self._call(
                    "get_object", name, Key=self.key(name))["Body"].read() == token:
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
        """Fail early and clearly on a missing bucket or refused credentials."""
        self._call("head_bucket", "")


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
