"""ctypes binding to the CUDA driver's checkpoint API (libcuda.so.1, driver >= 570).

libcuda is loaded on first use, never at import: `gpusnap --help` and every command that
touches no GPU must work on a host without a driver.

Layouts, from cuda.h (CUDA 12.8 to 13.x). Every argument struct is 64 bytes and its
reserved bytes must be zero. Later headers carve named fields out of the reserved space
(padding0, customStorageInfo_out) without moving gpuPairs or gpuPairsCount, so one
layout serves every driver that has the API; a zeroed field is the old behaviour.

  CUuuid                      { char bytes[16]; }                                     16
  CUcheckpointLockArgs        { u32 timeoutMs; u32 reserved0; u64 reserved1[7]; }     64
  CUcheckpointCheckpointArgs  { u64 reserved[8]; }                                    64
  CUcheckpointUnlockArgs      { u64 reserved[8]; }                                    64
  CUcheckpointGpuPair         { CUuuid oldUuid; CUuuid newUuid; }                     32
  CUcheckpointRestoreArgs     { CUcheckpointGpuPair *gpuPairs; u32 gpuPairsCount;
                                u32 padding0; u64 reserved[6]; }                      64

States (CUprocessState): RUNNING -lock-> LOCKED -checkpoint-> CHECKPOINTED -restore->
LOCKED -unlock-> RUNNING. FAILED is terminal. CHECKPOINTING and RESTORING are transient
values newer drivers report. Seen on r580 (580.159.04): a lock that times out returns
CUDA_ERROR_NOT_READY (not CUDA_ERROR_TIMEOUT) and leaves the process RUNNING; unlock
while CHECKPOINTED returns CUDA_ERROR_ILLEGAL_STATE; a restore onto a GPU the host lacks
returns CUDA_ERROR_INVALID_VALUE and leaves the process CHECKPOINTED, restorable.
"""

from __future__ import annotations

import ctypes
import enum
import re
import threading

from gpusnap.errors import CudaFailed, CudaUnavailable, GpuMismatch

LIBCUDA = "libcuda.so.1"
REMAP_MIN_DRIVER = 580      # restore onto other GPUs (gpuPairs) works from r580 on
API_MIN_DRIVER = 570        # the cuCheckpointProcess* entry points appeared in r570

CUDA_SUCCESS = 0


class CudaState(enum.IntEnum):
    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3
    CHECKPOINTING = 4
    RESTORING = 5


class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]     # char[16] in cuda.h; ubyte keeps NULs


class CUcheckpointLockArgs(ctypes.Structure):
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint),
                ("reserved1", ctypes.c_uint64 * 7)]


class CUcheckpointCheckpointArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class CUcheckpointUnlockArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class CUcheckpointGpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class CUcheckpointRestoreArgs(ctypes.Structure):
    _fields_ = [("gpuPairs", ctypes.POINTER(CUcheckpointGpuPair)),
                ("gpuPairsCount", ctypes.c_uint), ("padding0", ctypes.c_uint),
                ("reserved", ctypes.c_uint64 * 6)]


_P = ctypes.POINTER
_SIGNATURES = {
    "cuGetErrorName": [ctypes.c_int, _P(ctypes.c_char_p)],
    "cuDriverGetVersion": [_P(ctypes.c_int)],
    "cuInit": [ctypes.c_uint],
    "cuCheckpointProcessGetState": [ctypes.c_int, _P(ctypes.c_int)],
    "cuCheckpointProcessGetRestoreThreadId": [ctypes.c_int, _P(ctypes.c_int)],
    "cuCheckpointProcessLock": [ctypes.c_int, _P(CUcheckpointLockArgs)],
    "cuCheckpointProcessCheckpoint": [ctypes.c_int, _P(CUcheckpointCheckpointArgs)],
    "cuCheckpointProcessRestore": [ctypes.c_int, _P(CUcheckpointRestoreArgs)],
    "cuCheckpointProcessUnlock": [ctypes.c_int, _P(CUcheckpointUnlockArgs)],
}

# Hints for the results a checkpoint call is documented (or was seen) to return.
_LOCK_TIMEOUT_HINT = ("the process kept a CUDA call running past the lock timeout; "
                      "retry with a longer timeout or when it is idle")
_HINTS = {
    "CUDA_ERROR_NOT_READY": _LOCK_TIMEOUT_HINT,    # what r580 returns when a lock times out
    "CUDA_ERROR_TIMEOUT": _LOCK_TIMEOUT_HINT,
    "CUDA_ERROR_ILLEGAL_STATE": "the process is not in the state this step needs "
                                "(e.g. unlock while checkpointed: restore first)",
    "CUDA_ERROR_NOT_SUPPORTED": "the process uses something the driver cannot checkpoint "
                                "(UVM or IPC memory, MPS, or a GPU the driver cannot restore on)",
    "CUDA_ERROR_INVALID_VALUE": "the driver rejected the arguments (for a GPU remap: every "
                                "checkpointed GPU needs exactly one pair)",
    "CUDA_ERROR_NOT_INITIALIZED": "the driver is not initialized in gpusnap; enable "
                                  "persistence mode (nvidia-smi -pm 1)",
    # A context that already hit a sticky error reports it to the checkpoint calls too
    # (seen: lock -> CUDA_ERROR_ILLEGAL_ADDRESS); such a process cannot be checkpointed.
    "CUDA_ERROR_ILLEGAL_ADDRESS": "the process's CUDA context has already failed; it "
                                  "cannot be checkpointed",
    "CUDA_ERROR_LAUNCH_FAILED": "the process's CUDA context has already failed; it "
                                "cannot be checkpointed",
}


class CudaCallFailed(CudaFailed):
    """A CUDA checkpoint call failed."""

    def __init__(self, call: str, pid: int, code: int, name: str, hint: str | None = None):
        super().__init__(f"{call}(pid {pid}) failed: {name} ({code})",
                         hint=hint or _HINTS.get(name))
        self.call, self.pid, self.code, self.name = call, pid, code, name


def uuid_bytes(uuid: str) -> bytes:
    """'GPU-3f0e…' (as NVML and nvidia-smi print it) -> the 16 bytes of a CUuuid."""
    hexdigits = uuid.removeprefix("GPU-").replace("-", "")
    if len(hexdigits) != 32:
        raise GpuMismatch(f"not a full GPU UUID: {uuid!r}")
    try:
        return bytes.fromhex(hexdigits)
    except ValueError:
        raise GpuMismatch(f"not a GPU UUID: {uuid!r}") from None


def uuid_str(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def gpu_pairs(pairs: list[tuple[str, str]]) -> ctypes.Array:
    arr = (CUcheckpointGpuPair * len(pairs))()
    for slot, (old, new) in zip(arr, pairs):
        slot.oldUuid.bytes[:] = uuid_bytes(old)
        slot.newUuid.bytes[:] = uuid_bytes(new)
    return arr


def driver_major_from_cuda(cuda_version: int) -> int:
    """Lowest display driver branch that reports this CUDA version (for hosts where
    /proc/driver/nvidia/version is hidden, e.g. some containers)."""
    for cuda, major in ((13000, 580), (12090, 575), (12080, 570), (12040, 550)):
        if cuda_version >= cuda:
            return major
    return 0


def read_display_version(path: str = "/proc/driver/nvidia/version") -> str | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"Kernel Module.*?\s(\d{3,}\.\d+(?:\.\d+)?)\s", text)
    return m.group(1) if m else None


class CudaDriver:
    """The checkpoint API of one libcuda. Methods raise CudaUnavailable when the driver
    or the API is missing and CudaCallFailed (a CudaFailed) when a call fails."""

    def __init__(self, libname: str = LIBCUDA):
        self.libname = libname
        self._lib = None
        self._mutex = threading.Lock()
        self._init_result: int | None = None

    @property
    def loaded(self) -> bool:
        return self._lib is not None

    def _load(self):
        with self._mutex:
            if self._lib is None:
                self._lib = self._open()
        return self._lib

    def _open(self):
        try:
            lib = ctypes.CDLL(self.libname)
        except OSError as e:
            raise CudaUnavailable(f"cannot load the CUDA driver ({self.libname}): {e}",
                                  hint="install the NVIDIA driver (>= 570)") from None
        for name, argtypes in _SIGNATURES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise CudaUnavailable(
                    f"{self.libname} has no {name}: the driver predates the CUDA "
                    f"checkpoint API", hint=f"install NVIDIA driver >= {API_MIN_DRIVER} "
                    f"(>= {REMAP_MIN_DRIVER} to restore onto other GPUs)") from None
            fn.restype = ctypes.c_int
            fn.argtypes = argtypes
        return lib

    def error_name(self, code: int) -> str:
        name = ctypes.c_char_p()
        if self._load().cuGetErrorName(code, ctypes.byref(name)) == CUDA_SUCCESS and name.value:
            return name.value.decode()
        return f"CUresult {code}"

    def _call(self, call: str, pid: int, *args) -> None:
        code = getattr(self._load(), call)(pid, *args)
        if code != CUDA_SUCCESS:
            raise CudaCallFailed(call, pid, code, self.error_name(code))

    def version(self) -> int:
        """CUDA version the driver implements, as 1000*major + 10*minor (13000 = 13.0)."""
        v = ctypes.c_int()
        code = self._load().cuDriverGetVersion(ctypes.byref(v))
        if code != CUDA_SUCCESS:
            raise CudaUnavailable(f"cuDriverGetVersion failed: {self.error_name(code)}")
        return v.value

    def display_version(self) -> str | None:
        """The kernel module's version ('580.159.04'), None where it cannot be read."""
        return read_display_version()

    def driver_major(self) -> int:
        shown = self.display_version()
        return int(shown.split(".")[0]) if shown else driver_major_from_cuda(self.version())

    def check_remap(self) -> None:
        major = self.driver_major()
        if major < REMAP_MIN_DRIVER:
            raise CudaUnavailable(
                f"restoring onto other GPUs needs NVIDIA driver >= {REMAP_MIN_DRIVER}; "
                f"this host has {self.display_version() or major}",
                hint="restore on the GPUs the snapshot was taken on, or upgrade the driver")

    def init(self) -> int:
        """cuInit(0) once in gpusnap's own process. Restore requires it unless the GPUs
        are in persistence mode; the result is kept for error messages, not raised."""
        if self._init_result is None:
            self._init_result = self._load().cuInit(0)
        return self._init_result

    def get_state(self, pid: int) -> CudaState:
        state = ctypes.c_int()
        self._call("cuCheckpointProcessGetState", pid, ctypes.byref(state))
        try:
            return CudaState(state.value)
        except ValueError:
            raise CudaFailed(f"pid {pid}: unknown CUDA process state {state.value}") from None

    def restore_thread_id(self, pid: int) -> int:
        tid = ctypes.c_int()
        self._call("cuCheckpointProcessGetRestoreThreadId", pid, ctypes.byref(tid))
        return tid.value

    def lock(self, pid: int, timeout_ms: int = 0) -> None:
        """Block the process's CUDA calls; waits up to timeout_ms (0: forever) for the
        calls in flight to return."""
        args = CUcheckpointLockArgs(timeoutMs=timeout_ms)
        self._call("cuCheckpointProcessLock", pid, ctypes.byref(args))

    def checkpoint(self, pid: int) -> None:
        """Copy the process's device memory into its host memory and release the GPU."""
        self._call("cuCheckpointProcessCheckpoint", pid,
                   ctypes.byref(CUcheckpointCheckpointArgs()))

    def restore(self, pid: int, pairs: list[tuple[str, str]] | None = None) -> None:
        """Re-acquire the GPUs and copy device memory back; pairs (old UUID, new UUID)
        must then name every GPU the process had."""
        args = CUcheckpointRestoreArgs()
        if pairs:
            self.check_remap()
            arr = gpu_pairs(pairs)      # kept alive by this frame until the call returns
            args.gpuPairs = ctypes.cast(arr, ctypes.POINTER(CUcheckpointGpuPair))
            args.gpuPairsCount = len(pairs)
        init = self.init()
        try:
            self._call("cuCheckpointProcessRestore", pid, ctypes.byref(args))
        except CudaCallFailed as e:
            if init != CUDA_SUCCESS:
                e.hint = f"cuInit failed in gpusnap ({self.error_name(init)}); " + (e.hint or "")
            raise

    def unlock(self, pid: int) -> None:
        self._call("cuCheckpointProcessUnlock", pid, ctypes.byref(CUcheckpointUnlockArgs()))


_default: CudaDriver | None = None
_default_mutex = threading.Lock()


def get_driver() -> CudaDriver:
    """The process-wide driver (libcuda still unloaded until a method needs it)."""
    global _default
    with _default_mutex:
        if _default is None:
            _default = CudaDriver()
        return _default
