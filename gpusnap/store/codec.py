"""Chunk codecs: plain bytes <-> stored bytes, the chunk id function, and the manifest seal.

A store has one codec, named in its config (docs/design.md, "config"):

    PlainCodec      id   = hex SHA-256(plain)
                    chunk file    = zstd(plain)
                    manifest file = the JSON as it is
    EncryptedCodec  id   = hex HMAC-SHA256(id_key, plain)
                    chunk file    = nonce(12) || AES-256-GCM(enc_key, nonce, zstd(plain), aad)
                                    aad = "chunk:" + id
                    manifest file = nonce(12) || AES-256-GCM(enc_key, nonce, zstd(json), aad)
                                    aad = "snapshot:" + snapshot id
                    id_key, enc_key, check_key = HKDF-SHA256(master key, no salt,
                                    info = "gpusnap id-key v1" | "gpusnap enc-key v1" |
                                           "gpusnap key-check v1"), 32 bytes each
                    key_check (in the config) = hex HMAC-SHA256(check_key, "gpusnap key check")

Ids are taken from the plain bytes before compression (as borg does), so dedup works
whatever the compression level, and every read is verified: decode() checks the GCM tag
(encrypted), decompresses bounded by the plain size, and re-derives the id.
`cryptography` is imported only by EncryptedCodec (the `crypto` extra).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
import threading

import zstandard

from ..errors import IntegrityError, StoreError, WrongKey
from ..model.manifest import ZERO_ID

# ZERO_ID (imported above): an all-zero chunk, never stored, restored as a hole
NONCE_SIZE = 12
_TAG_SIZE = 16
KEY_SIZE = 32
MAX_MANIFEST = 256 << 20  # a manifest's plain JSON (one of 1 TB of images is ~60 MB)
_CHECK_LABEL = b"gpusnap key check"
_local = threading.local()


def chunk_id(data) -> str:
    return hashlib.sha256(data).hexdigest()


def is_zero(data: memoryview) -> bool:
    """One memcmp against a zero buffer, without copying (bytes.startswith takes any buffer;
    memoryview's own == compares byte by byte, about 15 times slower)."""
    zeros = getattr(_local, "zeros", None)
    if zeros is None or len(zeros) < len(data):
        zeros = _local.zeros = bytes(max(len(data), 1 << 20))
    return zeros.startswith(data)


# zstd's fast mode (negative levels: matches only, no entropy coding) decodes bf16 model
# weights at 8-10 GB/s a core against 1.2 GB/s for level 1, which stores them ~22% smaller
# (benchmarks/results/compress_levels_cpu.md): restore speed is what gpusnap is for.
FAST = -1
DEFAULT_LEVEL = FAST
NO_COMPRESSION = -(1 << 17)     # zstd's fastest level, near raw: chunk files stay zstd frames

# bf16 byte planes (`dump --compress bf16`): a chunk's even bytes, then its odd bytes, in
# one zstd frame. In little-endian bf16 the odd byte holds the sign and 7 of the 8 exponent
# bits, which weights use few of: its plane shrinks to about a third, while the even plane
# (mantissa) goes in raw blocks. bf16 weights store ~33% smaller against ~22% for level 1
# as they are, for a slow disk or object store; not the default (fast mode decodes several
# times faster). The frame follows a 12-byte zstd skippable frame naming the transform, so
# a reader that does not know it fails (the size does not match), never reads planes as data.
#
# The planes' frame is encoded with PLANES_PARAMS, not level 1: level 1's matcher finds
# short matches all over the exponent plane (few distinct bytes) and spends its time on
# them; a 64-entry hash table and 7-byte matches leave that plane to the entropy coder,
# which is what shrinks it. One core of an H200 host, split included: 0.81 GB/s against
# 0.39 as before, 0.670 of the plain size against 0.684, decoded at 1.23 GB/s against 1.02
# (fewer sequences; benchmarks/results/compress_levels_h200_s26.md). Any zstd frame reads
# back the same, so chunks written either way stay readable and dedup is unchanged (ids
# are of the plain bytes). The planes are split and joined with numpy where it is
# installed (the `bf16` extra: a split ~4x faster than bytes' strided slicing), else with
# bytes' slicing.
BF16 = 1 << 20                  # not a zstd level: the planes transform, PLANES_PARAMS
PLANES_HEAD = b"\x5e\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"bf16"
PLANES_PARAMS = dict(strategy=zstandard.STRATEGY_FAST, window_log=20, hash_log=6, chain_log=6,
                     search_log=1, min_match=7, target_length=0)
_NUMPY: list = []               # [numpy or None], looked up at first use
_BLAS_THREADS = "OPENBLAS_NUM_THREADS"


def _numpy():
    """numpy where it is installed, else None (looked up once). Imported with its BLAS
    held to one thread: only its strided copies are used, and at import OpenBLAS starts a
    thread a CPU in every process (a dump's 32 page-stream workers on 16 CPUs: ~480)."""
    if not _NUMPY:
        numpy = sys.modules.get("numpy")
        if numpy is None:
            saved = os.environ.get(_BLAS_THREADS)
            os.environ[_BLAS_THREADS] = "1"
            try:
                import numpy
            except ImportError:
                numpy = None
            finally:
                if saved is None:
                    del os.environ[_BLAS_THREADS]
                else:
                    os.environ[_BLAS_THREADS] = saved
        _NUMPY.append(numpy)
    return _NUMPY[0]


def _head(blob) -> tuple[bool, memoryview]:
    """(whether blob holds byte planes, its zstd frame)."""
    view = memoryview(blob)
    if bytes(view[:len(PLANES_HEAD)]) == PLANES_HEAD:
        return True, view[len(PLANES_HEAD):]
    return False, view


def _to_planes(data):
    """data's even bytes, then its odd bytes: numpy's strided copy into this thread's
    "planes_out" scratch buffer (valid until its next use), else bytes' own strided slicing
    (a memoryview's is ~15 times slower)."""
    np = _numpy()
    if np is None:
        data = data if isinstance(data, bytes) else bytes(data)
        return data[0::2] + data[1::2]
    size, half = len(data), len(data) // 2
    src = np.frombuffer(data, dtype=np.uint8)
    out = scratch(size, "planes_out")
    dst = np.frombuffer(out, dtype=np.uint8)
    dst[:half] = src[0::2]
    dst[half:] = src[1::2]
    return out


def _interleaved(planes: memoryview, into: memoryview | None = None) -> memoryview:
    """planes' two halves interleaved again, into `into` (returned) or this thread's
    "interleave" scratch buffer (valid until its next use): numpy's strided copy straight
    there; without numpy, a bytearray's strided assignment into the scratch buffer (C's
    loop; a memoryview's is ~15 times slower), then copied into `into`."""
    size, half = len(planes), len(planes) // 2
    if size % 2:                # compress() never writes planes of an odd size
        raise IntegrityError("a chunk of byte planes has an odd size")
    np = _numpy()
    if np is None:
        buf = scratch(size, "interleave").obj       # no view of it held while assigning
        buf[0:size:2] = planes[:half]
        buf[1:size:2] = planes[half:]
        if into is None:
            return memoryview(buf)[:size]
        into[:size] = memoryview(buf)[:size]
        return into
    out = into if into is not None else scratch(size, "interleave")
    src = np.frombuffer(planes, dtype=np.uint8)
    dst = np.frombuffer(out, dtype=np.uint8, count=size)
    dst[0::2] = src[:half]
    dst[1::2] = src[half:]
    return out


def has_frame_checksum(blob) -> bool:
    """Whether a chunk's zstd frame declares a content checksum (Frame_Header_Descriptor
    bit 2)."""
    blob = _head(blob)[1]
    return len(blob) > 4 and bytes(blob[:4]) == b"\x28\xb5\x2f\xfd" and bool(blob[4] & 0x04)


def compresses(level: int) -> bool:
    """Whether chunks at level cost real CPU to encode (BF16, zstd levels >= 1), not
    fast mode's or no compression's near-memcpy pace."""
    return level == BF16 or level >= 1


def compress(data, level: int = DEFAULT_LEVEL) -> bytes:
    """A chunk's stored bytes: one zstd frame at level, or with level BF16 (and an even
    size) PLANES_HEAD and a frame of its byte planes."""
    if level == BF16 and len(data) % 2 == 0:
        cctx = getattr(_local, "planes_cctx", None)
        if cctx is None:
            cctx = _local.planes_cctx = zstandard.ZstdCompressor(
                compression_params=zstandard.ZstdCompressionParameters(
                    **PLANES_PARAMS, write_content_size=1, write_checksum=1))
        return PLANES_HEAD + cctx.compress(_to_planes(data))
    if level == BF16:           # an odd size (never a page run): level 1 as it is
        level = 1
    cctx = getattr(_local, "cctx", None)
    if cctx is None or getattr(_local, "level", None) != level:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                                      write_checksum=True)
        _local.level = level
    return cctx.compress(data)


def decompress_bounded(blob, limit: int, what: str) -> bytes:
    """Decompress one zstd frame of at most limit bytes, or raise IntegrityError.

    decompress() allocates whatever size a frame header declares, whatever its
    max_output_size says (a 65 KB frame can declare 2 GB, or 2^40 bytes): the declared
    size is checked against limit first; a frame declaring none is bounded by limit."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    try:
        declared = zstandard.frame_content_size(blob)
        if declared > limit:
            raise IntegrityError(f"{what} declares {declared} bytes, more than the {limit} expected")
        return dctx.decompress(blob, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what} does not decompress: {exc}") from None


def _decompress(blob, expected_id: str, size: int) -> bytes:
    planes, frame = _head(blob)
    data = decompress_bounded(frame, size, f"chunk {expected_id[:16]}")
    if len(data) != size:
        raise IntegrityError(f"chunk {expected_id[:16]} does not match its hash")
    if planes:
        return bytes(_interleaved(memoryview(data)))
    return data


def scratch(size: int, name: str = "scratch") -> memoryview:
    """A per-thread buffer reused chunk after chunk: fresh 1 MiB allocations cost page
    faults on every chunk, which dominated ingest and materialise (a VM's first-touch
    faults made it 50x slower than the copy itself). name keeps apart buffers in use at
    once (plain bytes, sealed bytes)."""
    buf = getattr(_local, name, None)
    if buf is None or len(buf) < size:
        buf = bytearray(max(size, 1 << 20))
        setattr(_local, name, buf)
    return memoryview(buf)[:size]


def _decompress_into_scratch(blob, expected_id: str, size: int,
                             out: memoryview | None = None) -> memoryview:
    """Decompress into out (e.g. a view of the destination file's mapping), else into
    this thread's scratch buffer."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    if out is None:
        out = scratch(size)
    planes, frame = _head(blob)
    into = scratch(size, "planes") if planes else out
    got = 0
    try:
        with dctx.stream_reader(frame) as reader:
            while got < size:
                n = reader.readinto(into[got:])
                if not n:
                    break
                got += n
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk {expected_id[:16]} does not decompress: {exc}") from None
    if got != size or extra:
        raise IntegrityError(f"chunk {expected_id[:16]} does not match its hash")
    if planes:
        _interleaved(into, out)
    return out


class PlainCodec:
    """SHA-256 ids, zstd chunk files, plain JSON manifests."""

    encryption: str | None = None

    def describe(self) -> dict:
        """The fields of the store config (and of an archive header) naming this codec."""
        return {"hash": "sha256", "codec": "zstd"}

    def chunk_id(self, data) -> str:
        return chunk_id(data)

    def encode(self, cid: str, data, level: int = DEFAULT_LEVEL) -> bytes:
        return compress(data, level)

    def decode(self, blob, cid: str, size: int) -> bytes:
        data = _decompress(blob, cid, size)
        if self.chunk_id(data) != cid:
            raise IntegrityError(f"chunk {cid[:16]} does not match its hash")
        return data

    def decode_view(self, blob, cid: str, size: int, out: memoryview | None = None,
                    check: str = "id") -> memoryview:
        """decode() into out, or this thread's scratch buffer (valid until its next use).

        check="frame" (restore, reading the store's own chunks): a frame that carries zstd's
        content checksum (XXH64, written since 0.2) is verified by it as it decompresses,
        and the id is not re-derived: a SHA-256 pass costs more than the rest of a chunk's
        way into a restored process. `gpusnap verify` and import always re-derive ids."""
        out = _decompress_into_scratch(blob, cid, size, out)
        if check == "frame" and has_frame_checksum(blob):
            return out
        if self.chunk_id(out) != cid:
            raise IntegrityError(f"chunk {cid[:16]} does not match its hash")
        return out

    def seal(self, snap_id: str, data: bytes, kind: str = "snapshot") -> bytes:
        """A record's bytes as stored: a manifest (kind "snapshot") or a seed record."""
        return data

    def unseal(self, snap_id: str, blob: bytes, kind: str = "snapshot") -> bytes:
        return blob


PLAIN = PlainCodec()


def _hkdf(master: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(master)


def key_check(master: bytes) -> str:
    """What the config records to recognise the right key (reveals nothing of the key)."""
    return hmac.new(_hkdf(master, b"gpusnap key-check v1"), _CHECK_LABEL, "sha256").hexdigest()


class EncryptedCodec(PlainCodec):
    """HMAC-SHA256 ids, AES-256-GCM over zstd, for chunks and manifests alike.

    The salt-less KDF makes the subkeys depend on the key alone: two stores with one key
    have the same chunk ids, so an archive moves between them unchanged.
    """

    encryption = "aes-256-gcm"

    def __init__(self, master: bytes):
        if len(master) != KEY_SIZE:
            raise WrongKey(f"a gpusnap key is {KEY_SIZE} bytes, not {len(master)}")
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:
            raise StoreError("an encrypted store needs the `cryptography` package",
                             hint="pip install 'gpusnap[crypto]'") from None
        self._id_key = _hkdf(master, b"gpusnap id-key v1")
        self._aead = AESGCM(_hkdf(master, b"gpusnap enc-key v1"))
        self.key_check = key_check(master)

    def describe(self) -> dict:
        return {"hash": "hmac-sha256", "codec": "zstd", "encryption": self.encryption,
                "kdf": "hkdf-sha256", "key_check": self.key_check}

    def chunk_id(self, data) -> str:
        return hmac.digest(self._id_key, data, "sha256").hex()

    def _encrypt(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def _decrypt(self, blob, aad: bytes, what: str, into: bool = False):
        """The plain bytes of nonce || ciphertext+tag; into: in this thread's "sealed"
        scratch buffer (valid until its next use) instead of new bytes."""
        from cryptography.exceptions import InvalidTag
        view = memoryview(blob)
        if len(view) < NONCE_SIZE + _TAG_SIZE:
            raise IntegrityError(f"{what} is truncated")
        try:
            if not into:
                return self._aead.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
            out = scratch(len(view) - NONCE_SIZE - _TAG_SIZE, "sealed")
            self._aead.decrypt_into(view[:NONCE_SIZE], view[NONCE_SIZE:], aad, out)
            return out
        except InvalidTag:
            raise IntegrityError(f"{what} fails authentication (corrupt, truncated or "
                                 f"tampered with)") from None

    def encode(self, cid: str, data, level: int = DEFAULT_LEVEL) -> memoryview:
        """Valid until this thread's next encode (a scratch buffer, no 1 MiB allocation)."""
        packed = compress(data, level)
        out = scratch(NONCE_SIZE + len(packed) + _TAG_SIZE, "sealed")
        nonce = os.urandom(NONCE_SIZE)
        out[:NONCE_SIZE] = nonce
        self._aead.encrypt_into(nonce, packed, b"chunk:" + cid.encode(), out[NONCE_SIZE:])
        return out

    def decode(self, blob, cid: str, size: int) -> bytes:
        return super().decode(self._decrypt(blob, b"chunk:" + cid.encode(), f"chunk {cid[:16]}"),
                              cid, size)

    def decode_view(self, blob, cid: str, size: int, out: memoryview | None = None,
                    check: str = "id") -> memoryview:
        """check="frame": the GCM tag (checked by the decryption, bound to the id through
        the associated data) vouches for the bytes; the id's HMAC is not recomputed."""
        plain = self._decrypt(blob, b"chunk:" + cid.encode(), f"chunk {cid[:16]}", into=True)
        if check == "frame":
            return _decompress_into_scratch(plain, cid, size, out)
        return super().decode_view(plain, cid, size, out)

    def seal(self, snap_id: str, data: bytes, kind: str = "snapshot") -> bytes:
        # the kind in the aad: a seed record renamed to a manifest fails authentication
        return self._encrypt(compress(data), f"{kind}:{snap_id}".encode())

    def unseal(self, snap_id: str, blob: bytes, kind: str = "snapshot") -> bytes:
        what = f"manifest of snapshot {snap_id}" if kind == "snapshot" else f"{kind} record {snap_id}"
        sealed = self._decrypt(blob, f"{kind}:{snap_id}".encode(), what)
        return decompress_bounded(sealed, MAX_MANIFEST, what)


def for_config(config: dict, key: bytes | None, where: str) -> PlainCodec:
    """The codec a store's (or an archive's) config names, opened with key.

    No key for an encrypted store, a key for a plain one, or the wrong key: WrongKey.
    """
    encryption = config.get("encryption")
    if encryption is None:
        if config.get("hash", "sha256") != "sha256" or config.get("codec", "zstd") != "zstd":
            raise StoreError(f"{where} uses {config.get('hash')}/{config.get('codec')}; "
                             f"this gpusnap knows sha256/zstd")
        if key is not None:
            raise WrongKey(f"{where} is not encrypted, but a key file was given",
                           hint="drop --key-file (unset GPUSNAP_KEY_FILE), or use a new store")
        return PLAIN
    if encryption != EncryptedCodec.encryption:
        raise StoreError(f"{where} is encrypted with {encryption}; this gpusnap knows "
                         f"{EncryptedCodec.encryption}")
    if key is None:
        raise WrongKey(f"{where} is encrypted: give its key file",
                       hint="--key-file PATH or GPUSNAP_KEY_FILE")
    codec = EncryptedCodec(key)
    if not hmac.compare_digest(codec.key_check, str(config.get("key_check", ""))):
        raise WrongKey(f"the key file does not open {where} (wrong key)")
    return codec
