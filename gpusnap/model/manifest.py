"""A snapshot's manifest, typed: one definition per field, validated when read.

    Manifest.from_json(json.loads(text))   -> Manifest, or ManifestInvalid (exit 42)
    manifest.to_json()                     -> the dict stored as snapshots/<id>.json

The JSON layout (field names, nesting) is the one docs/design.md describes, unchanged
from the first manifests: `format` is the layout's version (MANIFEST_VERSION); a manifest
of another version is refused rather than half understood. Keys this gpusnap does not
know are kept in `extra` and written back as they were (a newer gpusnap may add fields
without a new version; export and import carry them unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields as dc_fields

from ..errors import ManifestInvalid
from .fields import HEX, HINT, REQUIRED, Fields, hex_str, int_in, invalid, number, pid, string
from .target import Target

MANIFEST_VERSION = 1
ZERO_ID = "zero"                        # a chunk of zeros: never stored
MAX_CHUNK_BYTES = 64 << 20              # no chunker makes more than 4 MiB
SNAPSHOT_ID_MAX = 64                    # 16 hex digits made here; 64 accepted on import


@dataclass
class FileEntry:
    """One stored file: its chunks (id, plain length), in order, concatenate to it."""
    path: str                           # relative to the image directory
    size: int
    mode: int = 0o600
    chunks: list[tuple[str, int]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "mode": self.mode,
                "chunks": [[cid, n] for cid, n in self.chunks]}

    @classmethod
    def from_json(cls, value, where: str = "file") -> "FileEntry":
        f = Fields(value, where)
        path = relative_path(f.raw("path"), f.at("path"))
        size = f.int("size")
        raw = f.raw("chunks")
        if type(raw) is not list:
            raise invalid(f.at("chunks"), "a list", raw)
        chunks = [(c[0], c[1]) if _plain_chunk(c) else _chunk(c, f"{where}.chunks[{i}]")
                  for i, c in enumerate(raw)]
        total = sum(n for _cid, n in chunks)
        if total != size:
            raise ManifestInvalid(f"{where} ({path}): its chunks add up to {total} "
                                  f"bytes, its size is {size}", hint=HINT)
        return cls(path, size, f.int("mode", 0o600, maximum=0o7777), chunks)


def _plain_chunk(value) -> bool:
    """value is a good [chunk id, length] pair (what _chunk accepts, checked without
    naming where: a manifest holds tens of thousands of them); else _chunk says why not."""
    if type(value) is not list or len(value) != 2:
        return False
    cid, n = value
    return (type(n) is int and 1 <= n <= MAX_CHUNK_BYTES and type(cid) is str
            and (cid == ZERO_ID or (len(cid) == 64 and HEX.fullmatch(cid) is not None)))


def _chunk(value, where: str) -> tuple[str, int]:
    if type(value) is not list or len(value) != 2:
        raise invalid(where, "a pair [chunk id, length]", value if type(value) is not list else REQUIRED)
    cid, n = value
    if cid != ZERO_ID:
        hex_str(cid, where + "[0]", length=64)
    return cid, int_in(n, where + "[1]", minimum=1, maximum=MAX_CHUNK_BYTES)


def relative_path(value, where: str) -> str:
    """A path that stays inside the directory it is relative to."""
    path = string(value, where)
    if not path or path.startswith("/") or "\0" in path or \
            any(part in ("", ".", "..") for part in path.split("/")):
        raise ManifestInvalid(f"{where} is {path!r}: a path must be relative, without "
                              f"'.', '..' or empty parts (it may not leave the image directory)",
                              hint=HINT)
    return path


def file_list(value, where: str) -> list[FileEntry]:
    """File entries with distinct paths, none under another one's path."""
    if type(value) is not list:
        raise invalid(where, "a list", value)
    entries = [FileEntry.from_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    paths: set[str] = set()
    for e in entries:
        if e.path in paths:
            raise ManifestInvalid(f"{where} names {e.path!r} twice", hint=HINT)
        paths.add(e.path)
    for e in entries:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                raise ManifestInvalid(f"{where}: {e.path!r} is under {'/'.join(parts[:i])!r}, "
                                      f"which is a file", hint=HINT)
    return entries


@dataclass
class CriuFacts:
    """CRIU options restore must repeat. stopped: the pids gpusnap stopped before CRIU
    dumped them (no network lock: criu/netlock.py), which CRIU recorded stopped and a
    restore continues."""
    shell_job: bool = False
    stopped: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"shell_job": self.shell_job, **({"stopped": self.stopped} if self.stopped else {})}

    @classmethod
    def from_json(cls, f: Fields) -> "CriuFacts":
        return cls(shell_job=f.bool("shell_job", False), stopped=f.list("stopped", pid, []))


def _gpu(value, where: str) -> dict:
    f = Fields(value, where)
    f.str("uuid")
    return value


@dataclass
class CudaFacts:
    """GPU facts for CUDA restore and remapping (cuda/session.py describe())."""
    pids: list[int]
    states: dict[str, str] = field(default_factory=dict)       # pid -> starting state
    driver_version: str | None = None
    cuda_driver_version: int | None = None
    gpus: list[dict] = field(default_factory=list)             # cuda.discover.GpuInfo as JSON
    used_memory: dict[str, int] = field(default_factory=dict)  # GPU uuid -> bytes
    # pid -> [[start, end], ...]: host memory the checkpoint added (cuda/staging.py)
    staging: dict[str, list[list[int]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"pids": list(self.pids), "states": dict(self.states),
               "driver_version": self.driver_version,
               "cuda_driver_version": self.cuda_driver_version,
               "gpus": list(self.gpus), "used_memory": dict(self.used_memory)}
        if self.staging:
            out["staging"] = {k: [list(r) for r in v] for k, v in self.staging.items()}
        return out

    def staging_ranges(self) -> dict[int, list[tuple[int, int]]]:
        return {int(k): [(s, e) for s, e in v] for k, v in self.staging.items()}

    @classmethod
    def from_json(cls, f: Fields) -> "CudaFacts":
        return cls(pids=f.list("pids", pid), states=f.mapping("states", string, dict),
                   driver_version=f.str("driver_version", None),
                   cuda_driver_version=f.int("cuda_driver_version", None),
                   gpus=f.list("gpus", _gpu, list),
                   used_memory=f.mapping("used_memory", lambda v, w: int_in(v, w), dict),
                   staging=_staging(f))


def _staging(f: Fields) -> dict[str, list[list[int]]]:
    out = f.mapping("staging", _ranges, dict)
    for key in out:
        pid(int(key) if key.isdigit() else key, f"{f.at('staging')}.{key}")
    return out


def _ranges(value, where: str) -> list[list[int]]:
    if type(value) is not list:
        raise invalid(where, "a list", value)
    return [_range(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _range(value, where: str) -> list[int]:
    if type(value) is not list or len(value) != 2:
        raise invalid(where, "[start, end]", value)
    start, end = (int_in(v, where, 0, (1 << 64) - 1) for v in value)
    if start >= end or start % 4096 or end % 4096:
        raise invalid(where, "page-aligned [start, end) with start < end")
    return [start, end]


@dataclass
class WeightFile:
    """A weight file an SDK agent reads back after restore (sdk/safetensors.file_identity)."""
    path: str
    size: int
    mtime_ns: int
    header_sha256: str
    content_sha256: str
    content_hash: str = "sampled"

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns,
                "header_sha256": self.header_sha256, "content_hash": self.content_hash,
                "content_sha256": self.content_sha256}

    @classmethod
    def from_json(cls, value, where: str) -> "WeightFile":
        f = Fields(value, where)
        return cls(path=f.str("path"), size=f.int("size"), mtime_ns=f.int("mtime_ns"),
                   header_sha256=f.str("header_sha256"), content_sha256=f.str("content_sha256"),
                   content_hash=f.str("content_hash", "sampled"))


@dataclass
class SdkAgent:
    """A cooperating server's agent that dropped its weights before the dump."""
    pid: int
    socket: str
    uid: int | None = None
    tensors: object = None
    weight_files: list[WeightFile] = field(default_factory=list)
    bytes_out_of_image: int = 0
    gpu_bytes_released: int | None = None
    backend: object = None              # the agent's reader, as it reported it

    def to_json(self) -> dict:
        return {"pid": self.pid, "socket": self.socket, "uid": self.uid, "tensors": self.tensors,
                "weight_files": [w.to_json() for w in self.weight_files],
                "bytes_out_of_image": self.bytes_out_of_image,
                "gpu_bytes_released": self.gpu_bytes_released, "backend": self.backend}

    @classmethod
    def from_json(cls, value, where: str) -> "SdkAgent":
        f = Fields(value, where)
        socket = f.str("socket")
        if not socket.startswith("/"):
            raise invalid(f.at("socket"), "an absolute path")
        return cls(pid=f.int("pid", minimum=1), socket=socket, uid=f.int("uid", None),
                   tensors=f.raw("tensors", None), weight_files=f.list("weight_files", WeightFile.from_json, list),
                   bytes_out_of_image=f.int("bytes_out_of_image", 0),
                   gpu_bytes_released=f.int("gpu_bytes_released", None, minimum=-(1 << 63)),
                   backend=f.raw("backend", None))


@dataclass
class SdkRecord:
    """The agents of a dump whose weights are outside the image (docs/sdk.md)."""
    agents: list[SdkAgent]
    bytes_out_of_image: int = 0

    def to_json(self) -> dict:
        return {"agents": [a.to_json() for a in self.agents],
                "bytes_out_of_image": self.bytes_out_of_image}

    @classmethod
    def from_json(cls, f: Fields) -> "SdkRecord":
        return cls(agents=f.list("agents", SdkAgent.from_json),
                   bytes_out_of_image=f.int("bytes_out_of_image", 0))


def _json(value):
    """A field's value as JSON (dataclasses by their to_json; lists of them too)."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if type(value) is list:
        return [_json(v) for v in value]
    return value


_UNSET_LEFT_OUT = ("seq", "downtime")   # absent from manifests of older gpusnap: kept absent


@dataclass(kw_only=True)
class Manifest:
    """One snapshot (docs/design.md, "snapshots/<snap-id>.json"). Attribute = JSON key."""
    target: Target
    pids: list[int]
    files: list[FileEntry]
    logs: list[FileEntry] = field(default_factory=list)
    id: str = ""                        # "": Repository.commit assigns one
    name: str | None = None
    created: str = ""                   # "": Repository.commit stamps it (UTC ISO 8601)
    format: int = MANIFEST_VERSION
    criu_version: str | None = None
    criu: CriuFacts = field(default_factory=CriuFacts)
    kernel: str | None = None
    host: str | None = None
    gpusnap_version: str | None = None
    bytes_logical: int = 0
    bytes_stored: int = 0
    bytes_new: int = 0
    zero_pages_dropped: int | None = None
    cuda: CudaFacts | None = None
    leave_running: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    downtime: float | None = None       # seconds the target was locked or frozen
    sdk: SdkRecord | None = None
    notes: list[str] = field(default_factory=list)
    seq: int | None = None              # the store's commit sequence (None: from before it)
    extra: dict = field(default_factory=dict)   # keys this gpusnap does not know, kept

    def to_json(self) -> dict:
        out = dict(self.extra)
        out.update((f.name, _json(getattr(self, f.name))) for f in dc_fields(self)
                   if f.name != "extra" and not (f.name in _UNSET_LEFT_OUT and
                                                 getattr(self, f.name) is None))
        return out

    @classmethod
    def from_json(cls, data) -> "Manifest":
        """The manifest in data (parsed JSON), or ManifestInvalid saying what is wrong."""
        f = Fields(data, "manifest")
        version = f.raw("format")
        if version != MANIFEST_VERSION or type(version) is not int:
            raise ManifestInvalid(f"manifest format {version!r} is not supported (this gpusnap "
                                  f"reads {MANIFEST_VERSION})", hint="use the gpusnap that wrote it")
        known = {fl.name for fl in dc_fields(cls)} - {"extra"}
        m = cls(id=hex_str(f.raw("id"), "manifest.id", max_length=SNAPSHOT_ID_MAX),
                name=f.str("name", None), created=f.str("created"), format=version,
                target=f.nested("target", Target.from_json), pids=f.list("pids", pid),
                criu_version=f.str("criu_version", None),
                criu=f.nested("criu", CriuFacts.from_json, CriuFacts),
                kernel=f.str("kernel", None), host=f.str("host", None),
                gpusnap_version=f.str("gpusnap_version", None),
                files=file_list(f.raw("files"), "manifest.files"),
                logs=file_list(f.raw("logs", list), "manifest.logs"),
                bytes_logical=f.int("bytes_logical", 0), bytes_stored=f.int("bytes_stored", 0),
                bytes_new=f.int("bytes_new", 0), zero_pages_dropped=f.int("zero_pages_dropped", None),
                cuda=f.nested("cuda", CudaFacts.from_json, None),
                leave_running=f.bool("leave_running", False),
                timings=f.mapping("timings", number, dict),
                downtime=None if f.raw("downtime", None) is None else
                number(f.raw("downtime"), f.at("downtime")),
                sdk=f.nested("sdk", SdkRecord.from_json, None),
                notes=f.list("notes", string, list), seq=f.int("seq", None),
                extra={k: v for k, v in data.items() if k not in known})
        return m

    # ---- what readers ask of a manifest ----------------------------------------------
    def file_entries(self) -> list[FileEntry]:
        """Every file the snapshot stores: the images, then CRIU's logs."""
        return self.files + self.logs

    def chunk_sizes(self) -> dict[str, int]:
        """Distinct stored (non-zero) chunk id -> plain length, over files and logs."""
        return {cid: n for entry in self.file_entries() for cid, n in entry.chunks
                if cid != ZERO_ID}

    def target_label(self) -> str:
        return f"{self.target.kind}:{self.target.name or self.target.root_pid}"


__all__ = ["Manifest", "FileEntry", "CriuFacts", "CudaFacts", "SdkRecord", "SdkAgent",
           "WeightFile", "MANIFEST_VERSION", "ZERO_ID", "relative_path", "file_list"]
