"""A Docker or Podman container named by name or id, as a Target.

Which engine knows the name is found out (docker first, then podman) unless --engine
says; a name both know is refused as ambiguous. Target.pids are the host pids of every
process in the container's pid namespace, its init first. Target.container holds what a
restore needs to rebuild the container elsewhere (engine, id, name, image, command,
environment, mounts, devices, the GPU device nodes it sees) and, for docker, the raw
create body (Config + HostConfig) to re-create it from.

The engines (docker_engine, podman_engine) implement container_engine.ContainerEngine
and share targets.devices; neither imports this module.
"""

from __future__ import annotations

import os
import stat

from ..errors import ContainerEngineError, TargetNotFound, UsageError
from ..model import Target
from .container_engine import ContainerEngine

ENGINES = ("docker", "podman")


def get_engine(kind: str) -> ContainerEngine:
    """The engine object for 'docker' or 'podman' (imports its client lazily)."""
    if kind == "docker":
        from .docker_engine import DockerEngine
        return DockerEngine()
    if kind == "podman":
        from .podman_engine import PodmanEngine
        return PodmanEngine()
    raise UsageError(f"unknown container engine '{kind}' (docker or podman)")


def find(name_or_id: str, engine: str | None = None) -> tuple[ContainerEngine, dict]:
    """(engine object, raw inspect dict) of the container, or TargetNotFound /
    UsageError (known to both engines) / ContainerEngineError (no engine usable)."""
    kinds = [engine] if engine else list(ENGINES)
    found, problems = [], []
    for kind in kinds:
        eng = get_engine(kind)
        why = eng.unavailable()
        if why:
            problems.append(f"{kind}: {why}")
            continue
        info = eng.inspect(name_or_id)
        if info is not None:
            found.append((eng, info))
    if len(found) > 1:
        raise UsageError(f"both docker and podman have a container '{name_or_id}'",
                         hint="choose one with --engine docker|podman")
    if found:
        return found[0]
    if problems and len(problems) == len(kinds):
        raise ContainerEngineError(f"no container engine usable: {'; '.join(problems)}",
                                   hint="scripts/setup-containers.sh installs and starts them")
    where = engine or " or ".join(k for k in kinds)
    raise TargetNotFound(f"no {where} container '{name_or_id}'",
                         hint="; ".join(problems) if problems else None)


def resolve(name_or_id: str, engine: str | None = None) -> Target:
    """The running container as a Target (kind 'docker' or 'podman')."""
    eng, info = find(name_or_id, engine)
    facts = eng.facts(info)
    if not facts["running"]:
        raise TargetNotFound(f"{eng.kind} container '{name_or_id}' is not running "
                             f"({facts['status']})")
    init_pid = facts.pop("pid")
    facts.pop("running")
    facts.pop("status")
    eng.check_checkpoint_support()
    pids = container_pids(init_pid)
    if os.getpid() in pids:
        raise UsageError("gpusnap runs inside this container; run it on the host")
    facts["gpu_devices"] = gpu_nodes(init_pid)
    return Target(kind=eng.kind, root_pid=init_pid, pids=pids, name=facts["name"],
                  cmdline=_cmdline(init_pid), container=facts)


# ---- host facts about a container's processes --------------------------------------

def _ns(pid: int, kind: str = "pid") -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def container_pids(init_pid: int) -> list[int]:
    """Host pids of the processes in init_pid's pid namespace (init first). A container
    that shares the host's pid namespace has no such set: refused."""
    target = _ns(init_pid)
    if target is None:
        raise TargetNotFound(f"container init pid {init_pid} is gone")
    if target == _ns(1) or target == _ns(os.getpid()):
        raise UsageError("the container shares the host's pid namespace (--pid=host); "
                         "gpusnap cannot tell its processes apart")
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != init_pid and _ns(int(entry)) == target:
            pids.append(int(entry))
    return [init_pid] + sorted(pids)


def gpu_nodes(init_pid: int) -> list[dict]:
    """The /dev/nvidia* nodes the container sees: [{path, major, minor}] (its /dev, read
    through /proc/PID/root; nodes a GPU toolkit made are listed too)."""
    out = []
    dev = f"/proc/{init_pid}/root/dev"
    try:
        names = sorted(os.listdir(dev))
    except OSError:
        return out
    for name in names:
        if not name.startswith("nvidia"):
            continue
        try:
            st = os.lstat(os.path.join(dev, name))
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode):
            out.append({"path": f"/dev/{name}", "major": os.major(st.st_rdev),
                        "minor": os.minor(st.st_rdev)})
    return out
