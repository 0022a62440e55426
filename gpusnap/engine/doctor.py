"""Host checks for `gpusnap doctor`: each says ok / missing / warn, and how to fix it."""

from __future__ import annotations

import ctypes.util
import os
import shutil
from dataclasses import asdict, dataclass

from .. import sysrun


@dataclass
class Check:
    name: str
    status: str          # ok | warn | missing
    detail: str
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _criu() -> list[Check]:
    from ..criu.locate import find_criu
    from ..errors import CriuMissing
    try:
        path, version = find_criu()
    except CriuMissing as exc:
        return [Check("criu", "missing", exc.message, exc.hint or "")]
    out = [Check("criu", "ok", f"{version} at {path}")]
    res = sysrun.run([path, "check"], timeout=60)
    text = (res.stdout + res.stderr).strip().splitlines()
    out.append(Check("criu check", "ok" if res.ok else "warn",
                     text[-1] if text else f"exit {res.returncode}",
                     "" if res.ok else f"run `{path} check` for details"))
    return out


def _kernel() -> list[Check]:
    out = []
    soft_dirty = _probe_soft_dirty()
    out.append(Check("soft-dirty tracking", "ok" if soft_dirty else "warn",
                     "present" if soft_dirty else "absent: CRIU pre-dump/--track-mem unusable; "
                     "gpusnap's incremental comes from its store dedup, so nothing is lost",
                     "" if soft_dirty else "kernel built without CONFIG_MEM_SOFT_DIRTY"))
    from .pagepath import uffd_available        # the check restore's --pages auto makes
    uffd, why = uffd_available()
    out.append(Check("userfaultfd", "ok" if uffd else "warn",
                     f"{why}: restore fills memory itself (--pages uffd)" if uffd else
                     f"{why}: restore lets CRIU write every page (--pages criu)"))
    return out


def _dump_buffer() -> list[Check]:
    """How far a --leave-running dump's page stream may run ahead of the disk here: a
    quarter of the memory left to gpusnap (its memory cgroup's limit counted), unless
    GPUSNAP_STREAM_SLOTS fixes the slots (store/pagestream.py)."""
    from .. import hostmem
    from ..store import pagestream
    if pagestream.slots_forced():
        n = pagestream.slot_count(1)
        return [Check("dump buffer", "ok", f"GPUSNAP_STREAM_SLOTS fixes {n} slots "
                      f"({n * pagestream.SLOT_BYTES >> 20} MiB): CRIU waits for the disk past them")]
    room = hostmem.cgroup_room()
    left = hostmem.available()
    limit = pagestream.buffer_slots(left) * pagestream.SLOT_BYTES
    where = f"of {left / 2**30:.1f} GiB left to gpusnap" + (
        " (its memory cgroup's limit)" if room is not None and room <= left else "")
    if limit < 1 << 30:
        return [Check("dump buffer", "warn", f"a --leave-running dump may buffer "
                      f"{limit >> 20} MiB of pages ({where}): CRIU, and the target's freeze, "
                      f"go at the disk's pace", "give gpusnap (gpusnapd's pod) more memory")]
    return [Check("dump buffer", "ok", f"a --leave-running dump may buffer up to "
                  f"{limit / 2**30:.1f} GiB of pages, a quarter {where} (less what the "
                  f"driver's checkpoint takes)")]


def _dump_slots() -> list[Check]:
    """Where a dump's page stream puts CRIU's pages (store/pagestream.private_wanted):
    private huge pages that its workers read, or shared memory that faults in 4 KiB pages."""
    from ..store import pagestream
    setting = pagestream.private_setting()
    if setting == "0":
        return [Check("dump slots", "ok", f"shared memory ({pagestream.PRIVATE_ENV}=0)")]
    if pagestream.workers_may_read():
        which = ("every dump's" if setting == "1"
                 else "a --leave-running dump's (the stream grows; others reuse a few shared slots)")
        return [Check("dump slots", "ok", f"private memory in huge pages, read by the page "
                      f"stream's workers, for {which}; a dump tries one read first, else uses "
                      f"shared memory")]
    return [Check("dump slots", "warn", "shared memory: a worker may not read gpusnap's "
                  "memory here (Yama's ptrace_scope, no CAP_SYS_PTRACE), and fresh shared "
                  "memory faults in 4 KiB pages, which slows a first --leave-running dump's "
                  "CRIU stage",
                  "run gpusnap as root with CAP_SYS_PTRACE")]


def _cpus() -> list[Check]:
    """The CPUs gpusnap's worker pools are sized from (hostcpu.py): its affinity within
    its CPU cgroup's quota, which in a pod is the pod's CPU limit, not the node's CPUs."""
    from .. import hostcpu
    from ..store import parallel
    n, quota, node = hostcpu.count(), hostcpu.cgroup_quota(), os.cpu_count() or 1
    why = (f"of {node} on the host: its CPU cgroup's quota" if quota is not None and quota <= n
           else f"of {node} on the host: the CPUs it may run on" if n < node else "")
    return [Check("cpus", "ok", f"{n} for gpusnap{' (' + why + ')' if why else ''}: "
                  f"{parallel.workers()} workers to store or restore a snapshot's chunks "
                  f"(GPUSNAP_THREADS sets them)")]


def _workdir() -> list[Check]:
    from . import workdir
    where = workdir.describe("<store>")
    if where["mounted_on_use"]:
        return [Check("work dir", "ok", f"{where['path']} (a tmpfs with huge pages, mounted by "
                      f"the first dump or restore; /dev/shm where mounting is refused)")]
    if where["huge_pages"]:
        return [Check("work dir", "ok", f"{where['path']} (tmpfs with huge pages)")]
    return [Check("work dir", "warn",
                  f"{where['path']} ({'tmpfs' if where['tmpfs'] else 'not tmpfs'}, no huge pages): "
                  "restores spend longer writing images out",
                  "run as root (gpusnap mounts its own huge-page tmpfs at "
                  f"{workdir.HUGE_BASE}), or point GPUSNAP_WORKDIR at one")]


def _probe_soft_dirty() -> bool:
    """Clear soft-dirty bits of ourselves and look for bit 55 after a write."""
    try:
        buf = bytearray(4096 * 4)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("4")
        buf[0] = 1
        addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((addr // 4096) * 8)
            entry = int.from_bytes(f.read(8), "little")
        return bool(entry >> 55 & 1)
    except OSError:
        return False


def _privileges() -> list[Check]:
    root = os.geteuid() == 0
    return [Check("root", "ok" if root else "missing",
                  "running as root" if root else f"uid {os.geteuid()}",
                  "" if root else "run gpusnap as root (CRIU needs CAP_SYS_ADMIN and more)")]


def _cuda() -> list[Check]:
    lib = ctypes.util.find_library("cuda") or ("libcuda.so.1" if os.path.exists("/dev/nvidiactl") else None)
    if not lib:
        return [Check("nvidia driver", "missing", "libcuda not found (no GPU here?)",
                      "install the NVIDIA driver >= 580 for GPU snapshots; CPU processes work without it")]
    try:
        from ..cuda import get_driver
        from ..cuda.driver import REMAP_MIN_DRIVER
        from ..errors import CudaUnavailable
        d = get_driver()
        try:
            d.version()              # loads libcuda and checks every checkpoint symbol
        except CudaUnavailable as exc:
            return [Check("nvidia driver", "warn", "libcuda loads", ""),
                    Check("cuda checkpoint api", "missing", exc.message, exc.hint or "")]
        major = d.driver_major()
        shown = d.display_version() or str(major)
        out = [Check("nvidia driver", "ok", f"{shown} (CUDA {d.version() // 1000}.{d.version() % 1000 // 10})"),
               Check("cuda checkpoint api", "ok", "cuCheckpointProcess* present")]
        remap = major >= REMAP_MIN_DRIVER
        out.append(Check("gpu remap (--gpu)", "ok" if remap else "warn",
                         "supported" if remap else f"driver {shown} < {REMAP_MIN_DRIVER}",
                         "" if remap else f"upgrade the driver to >= {REMAP_MIN_DRIVER}"))
        from ..cuda import host_gpus
        for g in host_gpus().gpus:
            out.append(Check(f"gpu {g.index}", "ok", f"{g.name} {g.uuid} {g.memory_free >> 20} MiB free"))
        return out
    except Exception as exc:  # noqa: BLE001 - doctor reports, never crashes
        return [Check("nvidia driver", "warn", f"libcuda present but unusable: {exc}")]


def _engines() -> list[Check]:
    out = []
    if shutil.which("docker"):
        try:
            import docker
            info = docker.from_env(timeout=5).info()
            exp = info.get("ExperimentalBuild", False)
            out.append(Check("docker", "ok" if exp else "warn",
                             f"daemon {info.get('ServerVersion')}, experimental={exp}",
                             "" if exp else "start dockerd with --experimental for checkpoints"))
        except Exception as exc:  # noqa: BLE001
            out.append(Check("docker", "warn", f"client present, daemon unreachable: {str(exc)[:80]}",
                             "scripts/setup-containers.sh"))
    else:
        out.append(Check("docker", "missing", "not installed", "scripts/setup-containers.sh"))
    podman = shutil.which("podman")
    if podman:
        res = sysrun.run([podman, "version", "--format", "{{.Client.Version}}"], timeout=20)
        out.append(Check("podman", "ok" if res.ok else "warn", res.stdout.strip() or res.stderr.strip()[:80]))
    else:
        out.append(Check("podman", "missing", "not installed", "scripts/setup-containers.sh"))
    return out


OTHER_FS = {0x9123683E: "btrfs", 0x01021994: "tmpfs", 0x6969: "nfs", 0x2FC12FC1: "zfs",
            0x794C7630: "overlayfs"}      # statfs f_type -> name, beside fsutil.JOURNALED


def store_writes(store: str) -> Check:
    """How a dump makes the store's new chunks durable there: one journal commit a batch
    (ext4, XFS), an fsync a chunk (elsewhere, or GPUSNAP_FSYNC=each); a store on tmpfs
    loses every snapshot at reboot. An s3:// store: each object is durable when its PUT
    returns. Asks the filesystem (statfs) of the store, or of the directory it will be
    made in; creates nothing."""
    from ..store import fsutil
    if store.startswith("s3://"):
        return Check("store writes", "ok", f"{store}: each object durable once its PUT returns")
    where = os.path.abspath(store)
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    kind = fsutil.fs_type(where)
    name = {**fsutil.JOURNALED, **OTHER_FS}.get(
        kind, f"filesystem {kind:#x}" if kind is not None else "an unknown filesystem")
    if name == "tmpfs":
        return Check("store writes", "warn", f"{store} is on tmpfs: its snapshots go at reboot",
                     "point --store (GPUSNAP_STORE) at a disk")
    if fsutil.fsync_each():
        how = f"an fsync a chunk ({fsutil.FSYNC_ENV}=each)"
    elif fsutil.batch_fsync(where):         # the writers' own test
        how = "a batch of new chunks made durable by one journal commit"
    else:
        how = "an fsync a chunk (batch commits only on ext4 and XFS)"
    return Check("store writes", "ok", f"{store} on {name}: {how}")


def _recoveries() -> list[Check]:
    """What guards and gpusnap starts did after a gpusnap died mid-operation."""
    from .intent import notes
    done = notes()
    if not done:
        return [Check("interrupted operations", "ok", "none recovered")]
    newest = done[0]
    return [Check("interrupted operations", "warn",
                  f"{len(done)} recovered; newest: a {newest['op']} that died during "
                  f"{newest['stage']}: {newest['action']}", "`gpusnap ps` lists them")]


def run_checks() -> list[Check]:
    checks: list[Check] = []
    for group in (_privileges, _criu, _kernel, _cpus, _workdir, _dump_buffer, _dump_slots, _recoveries,
                  _cuda, _engines):
        try:
            checks += group()
        except Exception as exc:  # noqa: BLE001
            checks.append(Check(group.__name__.strip("_"), "warn", f"check failed: {exc}"))
    return checks
