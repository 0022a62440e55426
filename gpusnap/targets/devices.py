"""Devices and mounts of a container, shared by the docker and podman engines.

Facts: an inspected container's mounts and devices, each device with its host node's
type and number as the manifest records them.

Device mapping (pure but for stat): a restore onto other GPUs (or with --device OLD:NEW)
turns into a map of host device paths, then into new device lists and the renumbering
of the nodes in CRIU's /dev image (gpusnap.imagefile.devnodes).
"""

from __future__ import annotations

import os
import stat

from ..errors import UsageError
from ..imagefile.devnodes import NodeChange

NVIDIA_PREFIX = "/dev/nvidia"


def mount_facts(info: dict) -> list[dict]:
    """The mounts of an inspected container (docker and podman name them alike)."""
    return [{"type": m.get("Type"), "source": m.get("Source") or m.get("Name"),
             "destination": m.get("Destination"), "rw": m.get("RW", True)}
            for m in info.get("Mounts") or []]


def device_facts(devices: list[dict], spec: dict | None = None) -> list[dict]:
    """Engine device entries ({PathOnHost, PathInContainer, CgroupPermissions}) with the
    host node's type and number, as recorded in the manifest.

    spec: the container's OCI spec, where its linux.devices are the truth about the
    numbers (podman 4.3's inspect names the wrong PathOnHost when a char and a block
    device share a number, e.g. /dev/vcs for /dev/loop0, both 7:0): the host path is
    then looked up by type and number."""
    in_spec = {d.get("path"): d for d in ((spec or {}).get("linux") or {}).get("devices") or []}
    out = []
    for d in devices or []:
        entry = {"host": d.get("PathOnHost", ""), "container": d.get("PathInContainer", ""),
                 "permissions": d.get("CgroupPermissions") or "rwm"}
        node = _node(entry["host"])
        want = in_spec.get(entry["container"])
        if want is not None:
            number = (want.get("type"), want.get("major"), want.get("minor"))
            if node != number:
                entry["host"] = find_host_node(*number) or entry["host"]
            node = number
        if node is not None:
            entry.update(type=node[0], major=node[1], minor=node[2])
        out.append(entry)
    return out


def _node(path: str) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISCHR(st.st_mode):
        return "c", os.major(st.st_rdev), os.minor(st.st_rdev)
    if stat.S_ISBLK(st.st_mode):
        return "b", os.major(st.st_rdev), os.minor(st.st_rdev)
    return None


def find_host_node(kind: str, major: int, minor: int, root: str = "/dev") -> str | None:
    """The first node under /dev (sorted, no symlinks) with this type and number."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and _node(path) == (kind, major, minor):
                return path
    return None


# ---- device mapping (pure) ----------------------------------------------------------

def parse_device_maps(items: list[str] | None) -> dict[str, str]:
    """--device OLD:NEW (host paths) -> {old: new}."""
    out = {}
    for item in items or []:
        old, sep, new = item.partition(":")
        if not sep or not old.startswith("/dev/") or not new.startswith("/dev/"):
            raise UsageError(f"--device {item}: expected OLD:NEW, two host device paths "
                             f"(/dev/nvidia0:/dev/nvidia1)")
        if old in out:
            raise UsageError(f"--device names {old} twice")
        out[old] = new
    return out


def gpu_device_map(snapshot_gpus: list[dict], host_gpus: list[dict],
                   pairs: list[tuple[str, str]] | None) -> dict[str, str]:
    """Host device paths to swap when the CUDA state moves by UUID pairs: each snapshot
    GPU's /dev/nvidia<minor> -> the new GPU's /dev/nvidia<minor>."""
    if not pairs:
        return {}
    old_minor = {g["uuid"]: g.get("minor") for g in snapshot_gpus}
    new_minor = {g["uuid"]: g.get("minor") for g in host_gpus}
    out = {}
    for old, new in pairs:
        a, b = old_minor.get(old), new_minor.get(new)
        if a is None or b is None:
            raise UsageError(f"cannot tell the device node of GPU {old if a is None else new}",
                             hint="NVML reported no minor number for it")
        if a != b:
            out[f"{NVIDIA_PREFIX}{a}"] = f"{NVIDIA_PREFIX}{b}"
    return out


def remap_devices(devices: list[dict], device_map: dict[str, str],
                  stat_new=None) -> tuple[list[dict], list[NodeChange], list[str]]:
    """Apply {old host path: new host path} to recorded devices.

    Returns (new device list, node changes for CRIU's /dev image, host paths of the
    map that the container did not have). The container path stays as it was: host
    /dev/nvidia1 is mapped to the /dev/nvidia0 the process knew. stat_new(path) ->
    (type, major, minor) of a host node (default: os.stat)."""
    stat_new = stat_new or host_node
    out, changes, used = [], [], set()
    for d in devices:
        new_host = device_map.get(d["host"])
        if new_host is None:
            out.append(dict(d))
            continue
        used.add(d["host"])
        kind, major, minor = stat_new(new_host)
        if "type" in d and kind != d["type"]:
            raise UsageError(f"--device {d['host']}:{new_host}: one is a "
                             f"{'character' if d['type'] == 'c' else 'block'} device, "
                             f"the other is not")
        out.append(dict(d, host=new_host, type=kind, major=major, minor=minor))
        if "major" in d and d["container"].startswith("/dev/"):
            changes.append(NodeChange(d["container"][len("/dev/"):],
                                      (d["major"], d["minor"]), (major, minor)))
    missing = [p for p in device_map if p not in used]
    return out, changes, missing


def host_node(path: str) -> tuple[str, int, int]:
    if not os.path.exists(path):
        raise UsageError(f"device {path} does not exist on this host")
    node = _node(path)
    if node is None:
        raise UsageError(f"{path} is not a device node")
    return node


def engine_devices(devices: list[dict]) -> list[dict]:
    """Recorded devices back into the engines' {PathOnHost, ...} form."""
    return [{"PathOnHost": d["host"], "PathInContainer": d["container"],
             "CgroupPermissions": d.get("permissions", "rwm")} for d in devices]


def apply_node_changes(images: str, changes: list[NodeChange]) -> list[str]:
    """Renumber device nodes in every tmpfs image of a CRIU image dir (in place)."""
    from ..imagefile import devnodes
    done = []
    for name in sorted(os.listdir(images)):
        if not (name.startswith("tmpfs-") and name.endswith(".tar.gz.img")):
            continue
        path = os.path.join(images, name)
        with open(path, "rb") as f:
            data = f.read()
        new, changed = devnodes.remap_gz(data, changes)
        if changed:
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(new)
            os.replace(tmp, path)
            done += changed
    return done
