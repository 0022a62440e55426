"""Error classes. Each carries its exit code; the docstring is the message template.

The CLI maps any GpusnapError to its exit_code and prints its message; nothing
else in gpusnap decides exit codes. Codes are stable and listed in `gpusnap --help`.
"""

from __future__ import annotations


class GpusnapError(Exception):
    """gpusnap failed."""

    exit_code = 1

    def __init__(self, message: str | None = None, *, hint: str | None = None):
        super().__init__(message or (self.__doc__ or "").strip())
        self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0])

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": self.message,
                "exit_code": self.exit_code, "hint": self.hint}


class UsageError(GpusnapError):
    """Bad arguments."""
    exit_code = 2


class SnapshotNotFound(GpusnapError):
    """No such snapshot."""
    exit_code = 3


class AmbiguousSnapshot(GpusnapError):
    """The name or id prefix matches more than one snapshot."""
    exit_code = 4


class TargetNotFound(GpusnapError):
    """The process or container to dump does not exist."""
    exit_code = 5


class PidInUse(GpusnapError):
    """A pid the snapshot needs is taken (is the original still running?)."""
    exit_code = 6


class OutsideDescriptors(GpusnapError):
    """The process tree shares a pipe, socket or terminal with a process outside it."""
    exit_code = 7


class CriuMissing(GpusnapError):
    """CRIU >= 4.1 is not installed."""
    exit_code = 10


class CriuFailed(GpusnapError):
    """CRIU failed, or the tree it restored died right after."""
    exit_code = 11


class RestoredTreeDied(CriuFailed):
    """The restored tree died right after the restore; what was left of it was killed.
    A CriuFailed (exit 11): not listed apart in the exit code table."""
    exit_code = 11


class ImageError(GpusnapError):
    """A CRIU image could not be read or rewritten."""
    exit_code = 12


class CudaUnavailable(GpusnapError):
    """The CUDA driver or its checkpoint API is not available."""
    exit_code = 20


class CudaFailed(GpusnapError):
    """A CUDA checkpoint call failed."""
    exit_code = 21


class GpuMismatch(GpusnapError):
    """The snapshot's GPUs cannot be mapped onto this host's GPUs."""
    exit_code = 22


class NcclPeerMemory(GpusnapError):
    """NCCL with CUDA IPC peer memory: the driver cannot restore it; refused before anything is touched."""
    exit_code = 23


class NoCudaProcess(GpusnapError):
    """No CUDA process in the target: nothing to suspend."""
    exit_code = 24


class NotParked(GpusnapError):
    """gpusnap holds nothing parked for this target (see gpusnap ps)."""
    exit_code = 25


class GpuRace(GpusnapError):
    """A process of the target started using the GPU during the dump, also on the retry; all undone."""
    exit_code = 26


class ContainerEngineError(GpusnapError):
    """The container engine failed or is not usable."""
    exit_code = 30


class StoreError(GpusnapError):
    """The snapshot store is unusable."""
    exit_code = 40


class StoreLocked(StoreError):
    """The store is locked by another gpusnap."""
    exit_code = 41


class IntegrityError(StoreError):
    """Stored data does not match its hash (corrupt or missing chunk)."""
    exit_code = 42


class ManifestInvalid(IntegrityError):
    """A snapshot's manifest is malformed (it parses, but does not describe a snapshot)."""
    exit_code = 42


class InsecureStore(StoreError):
    """The store can be read or written by other users."""
    exit_code = 43


class StoreFull(StoreError):
    """No space left in the store."""
    exit_code = 44


class ArchiveError(StoreError):
    """The archive is malformed or unsafe to import."""
    exit_code = 45


class WrongKey(StoreError):
    """The key does not open this store (wrong key, or none given for an encrypted store)."""
    exit_code = 46


class StoreDenied(StoreError):
    """The object store refused the credentials (wrong key, or no access to the bucket)."""
    exit_code = 47


class StoreUnavailable(StoreError):
    """The object store did not answer, or kept refusing (throttled) after every retry."""
    exit_code = 48


class AgentFailed(GpusnapError):
    """A cooperating server's gpusnap agent (gpusnap.sdk) failed or did not answer."""
    exit_code = 50


class WeightsChanged(GpusnapError):
    """A weight file the snapshot reloads from changed since the dump."""
    exit_code = 51


class Interrupted(GpusnapError):
    """Interrupted; every change to the target was undone."""
    exit_code = 130


ALL_ERRORS = [UsageError, SnapshotNotFound, AmbiguousSnapshot, TargetNotFound, PidInUse,
              OutsideDescriptors, CriuMissing, CriuFailed, ImageError, CudaUnavailable,
              CudaFailed, GpuMismatch, NcclPeerMemory, NoCudaProcess, NotParked, GpuRace,
              ContainerEngineError, StoreError, StoreLocked, IntegrityError, InsecureStore,
              StoreFull, ArchiveError, WrongKey, StoreDenied, StoreUnavailable, AgentFailed,
              WeightsChanged, Interrupted]


def exit_code_table() -> str:
    """The exit codes, one per line, for --help."""
    rows = [(0, "success"), (1, "unexpected error")] + [
        (cls.exit_code, (cls.__doc__ or "").strip()) for cls in ALL_ERRORS]
    return "\n".join(f"{code:>4}  {text}" for code, text in rows)
