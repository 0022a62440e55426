"""Which pids hold a CUDA context, and what GPUs this host has.

Finding CUDA pids asks /proc first and the driver second: a process with no /dev/nvidia*
descriptor and no libcuda mapping cannot have a context, so a host or a container with
no GPU work never loads libcuda. The driver's answer (cuCheckpointProcessGetState) is
the real test: nvidia-smi or an NVML-only monitor opens /dev/nvidia* without a context.
libcuda stays mapped in a checkpointed process after its descriptors are gone, which is
why the maps are read too.

GPU facts come from NVML (nvidia-ml-py), imported on first use. NVML lists every GPU of
the host whatever CUDA_VISIBLE_DEVICES says: UUIDs are what the checkpoint API takes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from gpusnap.cuda.driver import CudaDriver, get_driver
from gpusnap.errors import CudaFailed, CudaUnavailable


@dataclass
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total: int
    memory_free: int
    pci_bus_id: str
    minor: int | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GpuProcess:
    pid: int
    gpu_uuid: str
    used_memory: int | None     # None where NVML cannot tell (some vGPU and container setups)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HostGpus:
    driver_version: str         # display driver, '580.159.04'
    cuda_driver_version: int    # 13000 = CUDA 13.0
    gpus: list[GpuInfo] = field(default_factory=list)
    processes: list[GpuProcess] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"driver_version": self.driver_version,
                "cuda_driver_version": self.cuda_driver_version,
                "gpus": [g.to_dict() for g in self.gpus],
                "processes": [p.to_dict() for p in self.processes]}

    def used_memory(self, pids) -> dict[str, int]:
        """Device memory the given pids hold, per GPU UUID (what a restore will need)."""
        wanted, used = set(pids), {}
        for p in self.processes:
            if p.pid in wanted and p.used_memory:
                used[p.gpu_uuid] = used.get(p.gpu_uuid, 0) + p.used_memory
        return used


def _nvidia_fd(pid: int) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/nvidia"):
                return True
        except OSError:
            continue
    return False


def holds_nvidia_fd(pid: int) -> bool:
    """True if pid has a /dev/nvidia* descriptor open (a process whose CUDA state is
    checkpointed has none left); False if not, or if /proc would not say."""
    try:
        return _nvidia_fd(pid)
    except OSError:
        return False


def touches_nvidia(pid: int) -> bool | None:
    """True if pid has a /dev/nvidia* descriptor or maps libcuda, False if not,
    None if /proc would not say (another user's process: ask the driver)."""
    try:
        if _nvidia_fd(pid):
            return True
        with open(f"/proc/{pid}/maps") as maps:
            return any("libcuda.so" in line for line in maps)
    except PermissionError:
        return None
    except (FileNotFoundError, ProcessLookupError):
        return False


def cuda_pids(pids, driver: CudaDriver | None = None) -> list[int]:
    """The pids, in the order given, that have initialized CUDA. gpusnap's own pid is
    left out: once it has called cuInit (restore does) the driver reports it RUNNING
    too, context or not."""
    me = os.getpid()
    candidates = [pid for pid in pids if pid != me and touches_nvidia(pid) is not False]
    if not candidates:
        return []
    driver = driver or get_driver()
    found = []
    for pid in candidates:
        try:
            driver.get_state(pid)
        except CudaUnavailable:
            raise
        except CudaFailed:
            continue
        found.append(pid)
    return found


def parse_visible(value: str | None, gpus: list[GpuInfo]) -> list[GpuInfo] | None:
    """The GPUs a CUDA_VISIBLE_DEVICES value leaves visible, in NVML order; None when it
    does not restrict (unset) or cannot be read here (MIG, a bad token). Indexes are taken
    as NVML indexes: CUDA's default FASTEST_FIRST order breaks ties by PCI bus id, which
    is NVML's order, so they agree on hosts of one GPU model."""
    if value is None:
        return None
    picked: list[GpuInfo] = []
    for token in (t.strip() for t in value.split(",")):
        if not token:
            break
        if token.lstrip("-").isdigit():
            if int(token) < 0:
                break           # CUDA stops at the first invalid index
            hit = [g for g in gpus if g.index == int(token)]
        else:
            hit = [g for g in gpus if g.uuid.lower().startswith(token.lower()) or
                   g.uuid.lower().removeprefix("gpu-").startswith(token.lower())]
        if len(hit) != 1:
            return None
        if hit[0] not in picked:
            picked.append(hit[0])
    return sorted(picked, key=lambda g: g.index) or None


def _environ_value(pid: int, key: str) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    prefix = key.encode() + b"="
    for entry in entries:
        if entry.startswith(prefix):
            return entry[len(prefix):].decode(errors="replace")
    return None


def visible_gpus(gpus: list[GpuInfo], pids) -> list[GpuInfo]:
    """The GPUs these pids could see: the union of what each one's CUDA_VISIBLE_DEVICES
    leaves, or all of them if any pid is unrestricted or unreadable. A restore onto other
    GPUs must map every one of these (the driver refuses a partial map)."""
    seen: dict[str, GpuInfo] = {}
    for pid in pids:
        picked = parse_visible(_environ_value(pid, "CUDA_VISIBLE_DEVICES"), gpus)
        if picked is None:
            return list(gpus)
        seen.update((g.uuid, g) for g in picked)
    return sorted(seen.values(), key=lambda g: g.index) if seen else list(gpus)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml():
    try:
        import pynvml
    except ImportError:
        raise CudaUnavailable("NVML bindings are missing",
                              hint="pip install nvidia-ml-py") from None
    return pynvml


def host_gpus() -> HostGpus:
    """Every GPU of the host with its free memory, and the processes using each."""
    nv = _nvml()
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        raise CudaUnavailable(f"NVML cannot start: {e}",
                              hint="is the NVIDIA driver loaded (nvidia-smi)?") from None
    try:
        host = HostGpus(_text(nv.nvmlSystemGetDriverVersion()),
                        int(nv.nvmlSystemGetCudaDriverVersion()))
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nv.nvmlDeviceGetUUID(handle))
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            try:
                minor = int(nv.nvmlDeviceGetMinorNumber(handle))
            except nv.NVMLError:
                minor = None
            host.gpus.append(GpuInfo(index, uuid, _text(nv.nvmlDeviceGetName(handle)),
                                     int(mem.total), int(mem.free),
                                     _text(nv.nvmlDeviceGetPciInfo(handle).busId), minor))
            try:
                procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
            except nv.NVMLError:
                procs = []
            for p in procs:
                used = p.usedGpuMemory
                host.processes.append(GpuProcess(int(p.pid), uuid,
                                                 int(used) if used is not None else None))
        return host
    except nv.NVMLError as e:
        raise CudaUnavailable(f"NVML query failed: {e}") from None
    finally:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass
