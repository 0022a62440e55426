"""safetensors headers and file identity, read without the safetensors package. Stdlib only.

The format (https://github.com/huggingface/safetensors, "Format"):

    FILE   ::= N:u64-le  HEADER:N bytes  DATA
    HEADER ::= JSON object, UTF-8, may end in spaces:
               {"__metadata__": {str: str}?,  NAME: {"dtype": DT, "shape": [int, ...],
                                                     "data_offsets": [BEGIN, END]}, ...}

BEGIN and END are relative to the start of DATA (byte 8 + N); END - BEGIN is the
tensor's size, C order, little-endian. parse_header() takes a file object and is pure;
read_header() and file_identity() open a path.

File identity (what a snapshot records so that a restore can tell whether the weights
it will reload are the ones that were dropped): path, size, mtime_ns, the SHA-256 of the
header (names, dtypes, shapes, offsets), and a content hash. The content hash is
"sampled" by default: SHA-256 over 64 blocks of 64 KiB spread evenly over the file (the
first and the last included), 4 MiB read whatever the file's size. A full SHA-256 of a
16 GB checkpoint reads 16 GB and costs ~8 s at ~2 GB/s on one core: it would eat the
restore time the SDK saves. Size + mtime_ns + header catch every ordinary replacement
(a new export, a different model, a truncated copy); the samples catch a same-size
rewrite that kept the layout. What sampling misses (a few bytes changed in place with
mtime forged back) the agent's reload check still sees: after a reload the agent
compares every tensor's fingerprint with the one it took before dropping it.
mode="full" hashes the whole file (GPUSNAP_SDK_HASH=full) for who wants that.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

MAX_HEADER = 100 << 20          # safetensors' own limit
SAMPLES, SAMPLE_SIZE = 64, 64 << 10

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


class HeaderError(ValueError):
    """A safetensors header that does not parse or does not add up."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str                  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int                 # absolute offset in the file
    length: int                 # bytes


@dataclass
class Header:
    path: str
    entries: dict[str, TensorEntry]
    metadata: dict = field(default_factory=dict)
    header_len: int = 0         # N: the JSON's length
    data_start: int = 0         # 8 + N
    sha256: str = ""            # of the first 8 + N bytes


def parse_header(f, size: int | None = None, path: str = "") -> Header:
    """Parse the header at the start of file object f. size (the file's length, if
    known) bounds every tensor's range."""
    raw_len = f.read(8)
    if len(raw_len) != 8:
        raise HeaderError(f"{path or 'file'}: shorter than 8 bytes: not safetensors")
    (n,) = struct.unpack("<Q", raw_len)
    if n > MAX_HEADER:
        raise HeaderError(f"{path or 'file'}: header length {n} is over {MAX_HEADER}: not safetensors")
    raw = f.read(n)
    if len(raw) != n:
        raise HeaderError(f"{path or 'file'}: header cut short ({len(raw)} of {n} bytes)")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HeaderError(f"{path or 'file'}: header is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{path or 'file'}: header is not a JSON object")
    data_start = 8 + n
    data_len = None if size is None else size - data_start
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise HeaderError(f"{path or 'file'}: __metadata__ is not an object")
    entries = {}
    for name, e in obj.items():
        where = f"{path or 'file'}: tensor {name!r}"
        if not isinstance(e, dict):
            raise HeaderError(f"{where}: not an object")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise HeaderError(f"{where}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise HeaderError(f"{where}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise HeaderError(f"{where}: bad data_offsets {offs!r}")
        count = 1
        for d in shape:
            count *= d
        if offs[1] - offs[0] != count * DTYPE_SIZES[dtype]:
            raise HeaderError(f"{where}: {offs[1] - offs[0]} bytes for shape {shape} of {dtype}")
        if data_len is not None and offs[1] > data_len:
            raise HeaderError(f"{where}: ends at {offs[1]}, past the file's {data_len} data bytes")
        entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + offs[0], offs[1] - offs[0])
    return Header(path=path, entries=entries, metadata=metadata, header_len=n,
                  data_start=data_start, sha256=hashlib.sha256(raw_len + raw).hexdigest())


def read_header(path: str) -> Header:
    with open(path, "rb") as f:
        return parse_header(f, os.fstat(f.fileno()).st_size, path)


def _sample_offsets(size: int) -> list[int]:
    if size <= SAMPLES * SAMPLE_SIZE:
        return [0]                               # small: the whole file is the sample
    last = size - SAMPLE_SIZE
    return sorted({i * last // (SAMPLES - 1) for i in range(SAMPLES)})


def content_hash(path: str, mode: str = "sampled") -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if mode == "full" or size <= SAMPLES * SAMPLE_SIZE:
            while True:
                b = f.read(8 << 20)
                if not b:
                    break
                h.update(b)
        elif mode == "sampled":
            h.update(struct.pack("<Q", size))
            for off in _sample_offsets(size):
                h.update(os.pread(f.fileno(), SAMPLE_SIZE, off))
        else:
            raise ValueError(f"hash mode {mode!r}: 'sampled' or 'full'")
    return h.hexdigest()


def file_identity(path: str, mode: str | None = None) -> dict:
    """What a snapshot records of a weight file (see the module's docstring)."""
    mode = mode or os.environ.get("GPUSNAP_SDK_HASH", "sampled")
    path = os.path.realpath(path)
    st = os.stat(path)
    header = read_header(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "header_sha256": header.sha256, "content_hash": mode,
            "content_sha256": content_hash(path, mode)}


def identity_changes(recorded: dict, quick: bool = False) -> list[str]:
    """How the file at recorded['path'] differs from its record; [] if it does not.
    quick: size, mtime and header only (the agent's own check before a reload)."""
    path = recorded["path"]
    try:
        st = os.stat(path)
    except OSError as e:
        return [f"{path}: {e.strerror}"]
    out = []
    if st.st_size != recorded["size"]:
        out.append(f"{path}: size {recorded['size']} -> {st.st_size}")
    if st.st_mtime_ns != recorded["mtime_ns"]:
        out.append(f"{path}: mtime_ns {recorded['mtime_ns']} -> {st.st_mtime_ns}")
    if out:
        return out
    try:
        if read_header(path).sha256 != recorded["header_sha256"]:
            out.append(f"{path}: safetensors header changed")
        elif not quick and content_hash(path, recorded.get("content_hash", "sampled")) != recorded["content_sha256"]:
            out.append(f"{path}: content changed ({recorded.get('content_hash', 'sampled')} SHA-256)")
    except (OSError, HeaderError) as e:
        out.append(f"{path}: {e}")
    return out
