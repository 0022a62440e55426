"""Podman through its CLI (gpusnap.sysrun), as root.

    podman container checkpoint --export X.tar --compress none [-R] [--ignore-rootfs] ID
    podman container restore --import X.tar [--name NEW] 
    podman container restore ID                     (in place: undo of a failed dump)

The export is a plain tar: checkpoint/ (the CRIU images), config.dump (libpod's
config, the OCI spec inside), spec.dump (the OCI spec), rootfs-diff.tar (the writable
layer's changes), devshm-checkpoint.tar, network.status, ... gpusnap stores it unpacked,
so the store dedups the image files, and re-tars it for a restore. `--compress` must be
given: podman 4.3 writes zstd whatever the file is called.

runc looks criu up on PATH, so podman runs with the directory of gpusnap's CRIU first.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile

from .. import sysrun
from ..errors import ContainerEngineError
from .container_engine import ContainerEngine
from .devices import apply_node_changes, device_facts, mount_facts

RESTORE_MARKER = "gpusnap-restore"     # also read by hooks/gpusnap-criu-hook
CRIU_FLAGS = ["--tcp-established", "--file-locks"]


class PodmanEngine(ContainerEngine):
    kind = "podman"

    def __init__(self):
        self._binary: str | None = None

    # ---- running podman -------------------------------------------------------------
    @property
    def binary(self) -> str:
        if self._binary is None:
            path = shutil.which("podman", path=sysrun.clean_env()["PATH"] + ":" + sysrun.SAFE_PATH)
            if not path:
                raise ContainerEngineError("podman is not installed",
                                           hint="scripts/setup-containers.sh installs it")
            self._binary = path
        return self._binary

    def _env(self) -> dict[str, str]:
        path = sysrun.clean_env()["PATH"]
        try:
            from ..criu.locate import find_criu
            criu_dir = os.path.dirname(find_criu()[0])
            path = f"{criu_dir}:{path}"
        except Exception:  # noqa: BLE001 - podman then reports what is missing itself
            pass
        return {"PATH": path}

    def run(self, *args: str, timeout: float = 3600) -> sysrun.Result:
        return sysrun.run([self.binary, *args], env=self._env(), timeout=timeout)

    def _check(self, what: str, res: sysrun.Result) -> sysrun.Result:
        if not res.ok:
            lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
            raise ContainerEngineError(f"podman {what} failed (exit {res.returncode}): "
                                       f"{lines[-1] if lines else 'no output'}")
        return res

    def unavailable(self) -> str | None:
        try:
            self.binary
        except ContainerEngineError as e:
            return e.message
        return None

    def check_checkpoint_support(self) -> None:
        """podman checks CRIU itself when it checkpoints."""

    # ---- facts ----------------------------------------------------------------------
    def inspect(self, ref: str) -> dict | None:
        res = self.run("container", "inspect", ref, timeout=60)
        if not res.ok:
            if "no such container" in res.stderr.lower():
                return None
            self._check(f"inspect {ref}", res)
        try:
            data = json.loads(res.stdout)
        except ValueError:
            raise ContainerEngineError(f"podman inspect {ref}: unreadable output") from None
        return data[0] if data else None

    def version(self) -> str | None:
        res = self.run("version", "--format", "{{.Client.Version}}", timeout=60)
        return res.stdout.strip() if res.ok else None

    def facts(self, info: dict) -> dict:
        cfg, host, state = info.get("Config") or {}, info.get("HostConfig") or {}, info["State"]
        entrypoint = cfg.get("Entrypoint") or []
        if isinstance(entrypoint, str):
            entrypoint = [entrypoint] if entrypoint else []
        return {
            "engine": "podman", "engine_version": self.version(),
            "id": info["Id"], "name": info["Name"],
            "image": info.get("ImageName") or cfg.get("Image"), "image_id": info.get("Image"),
            "cmd": cfg.get("Cmd") or [], "entrypoint": entrypoint,
            "env": cfg.get("Env") or [], "working_dir": cfg.get("WorkingDir") or "",
            "user": cfg.get("User") or "", "tty": bool(cfg.get("Tty")),
            "hostname": cfg.get("Hostname") or "",
            "mounts": mount_facts(info),
            "devices": device_facts(host.get("Devices"), _spec(info)),
            "rootfs_diff": True,          # comes with the export (rootfs-diff.tar)
            "running": state.get("Status") == "running",
            "status": state.get("Status"), "pid": int(state.get("Pid") or 0),
        }

    def state(self, ref: str) -> tuple[bool, int]:
        info = self.inspect(ref)
        if info is None:
            raise ContainerEngineError(f"podman container {ref} is gone")
        st = info["State"]
        return st.get("Status") == "running", int(st.get("Pid") or 0)

    # ---- checkpoint -----------------------------------------------------------------
    def checkpoint(self, facts: dict, dest: str, work: str, leave_running: bool, *,
                   ignore_rootfs: bool = False) -> None:
        """The export, unpacked into dest (dest/checkpoint/ holds the CRIU images)."""
        tar = os.path.join(work, "podman-export.tar")
        args = ["container", "checkpoint", "--export", tar, "--compress", "none", *CRIU_FLAGS]
        if leave_running:
            args.append("--leave-running")
        if ignore_rootfs:
            args.append("--ignore-rootfs")
        self._check("container checkpoint", self.run(*args, facts["id"]))
        try:
            with tarfile.open(tar) as t:
                _extract(t, dest)
        finally:
            os.unlink(tar)
        if not os.path.exists(os.path.join(dest, "checkpoint", "inventory.img")):
            raise ContainerEngineError("podman's export holds no checkpoint/inventory.img")
        facts["rootfs_diff"] = os.path.exists(os.path.join(dest, "rootfs-diff.tar"))

    def resume_from(self, facts: dict, tree: str) -> int:
        """Undo a checkpoint that stopped the container: podman keeps its local copy of
        the images after an export, so an in-place restore brings it back."""
        self._check("container restore", self.run("container", "restore", *CRIU_FLAGS,
                                                  facts["id"]))
        running, pid = self.state(facts["id"])
        if not running:
            raise ContainerEngineError(f"podman container {facts['name']} did not come back")
        return pid

    # ---- restore ---------------------------------------------------------------------
    def remove(self, ref: str) -> None:
        self.run("rm", "-f", "-t", "0", ref, timeout=120)

    def kill(self, ref: str) -> None:
        self.run("kill", ref, timeout=60)

    def restore(self, facts: dict, materialise, *, into: str | None, name: str,
                devices: list[dict] | None, node_changes, work: str, marker: str) -> dict:
        """Restore as the stopped container `into` (it is replaced by the import, which
        keeps its id and name), or as a new container called `name`."""
        tree = os.path.join(work, "tree")
        tar = os.path.join(work, "restore.tar")
        materialise(tree, "")
        images = os.path.join(tree, "checkpoint")
        if not os.path.exists(os.path.join(images, "inventory.img")):
            raise ContainerEngineError("the snapshot holds no checkpoint/inventory.img")
        with open(os.path.join(images, RESTORE_MARKER), "w") as f:
            f.write(f"{marker}\n")
        if node_changes:
            apply_node_changes(images, node_changes)
        if devices is not None:
            rewrite_device_config(tree, facts.get("devices") or [], devices)
        with tarfile.open(tar, "w") as t:
            for entry in sorted(os.listdir(tree)):
                t.add(os.path.join(tree, entry), arcname=entry)
        shutil.rmtree(tree, ignore_errors=True)
        args = ["container", "restore", "--import", tar, "--file-locks"]
        if into is not None:
            self._check("rm", self.run("rm", "--force", "--time", "0", into, timeout=120))
            args.append("--tcp-established")
        else:
            # podman refuses --tcp-established with --name: a copy cannot take over
            # the original's connections
            args += ["--name", name, "--ignore-static-ip", "--ignore-static-mac"]
        res = self._check("container restore --import", self.run(*args))
        os.unlink(tar)
        cid = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else (into or name)
        try:
            running, pid = self.state(cid)
            if not running or pid <= 0:
                raise ContainerEngineError(f"podman restored container {cid[:12]} is not running")
        except BaseException:
            if into is None:
                self.remove(cid)
            raise
        info = self.inspect(cid) or {}
        return {"engine": "podman", "id": info.get("Id", cid), "name": info.get("Name", name),
                "pid": pid, "created": into is None}


def _spec(info: dict) -> dict | None:
    """The container's OCI spec (the bundle's config.json), None if unreadable."""
    path = info.get("OCIConfigPath")
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _extract(t: tarfile.TarFile, dest: str) -> None:
    os.makedirs(dest, mode=0o700, exist_ok=True)
    try:
        t.extractall(dest, filter="tar")        # Python >= 3.11.4 / 3.12: no escapes
    except TypeError:
        for member in t.getmembers():
            target = os.path.realpath(os.path.join(dest, member.name))
            if not target.startswith(os.path.realpath(dest) + os.sep):
                raise ContainerEngineError(f"podman export member escapes: {member.name}")
        t.extractall(dest)


def remap_spec_devices(spec: dict, old: list[dict], new: list[dict]) -> None:
    """OCI spec: linux.devices and the device cgroup allow rules, old numbers -> new
    (pairwise over the recorded device lists; pure, in place)."""
    linux = spec.get("linux") or {}
    for before, after in zip(old, new):
        if before.get("major") is None or after.get("major") is None:
            continue
        a = (before["major"], before["minor"])
        b = (after["major"], after["minor"])
        if a == b:
            continue
        for d in linux.get("devices") or []:
            if d.get("path") == before["container"] and (d.get("major"), d.get("minor")) == a:
                d["major"], d["minor"] = b
        for rule in (linux.get("resources") or {}).get("devices") or []:
            if rule.get("allow") and (rule.get("major"), rule.get("minor")) == a \
                    and rule.get("type", before.get("type")) == before.get("type"):
                rule["major"], rule["minor"] = b


def remap_host_sources(sources: list[dict], old: list[dict], new: list[dict]) -> None:
    """libpod config.dump device_host_src ('HOST:CONTAINER[:perms]') -> new host paths."""
    swap = {b["host"]: a["host"] for b, a in zip(old, new) if b["host"] != a["host"]}
    for src in sources or []:
        host, sep, rest = src.get("path", "").partition(":")
        if host in swap:
            src["path"] = swap[host] + sep + rest


def rewrite_device_config(tree: str, old: list[dict], new: list[dict]) -> None:
    """Rewrite config.dump and spec.dump of an unpacked export for the new devices."""
    cfg_path, spec_path = os.path.join(tree, "config.dump"), os.path.join(tree, "spec.dump")
    with open(cfg_path) as f:
        cfg = json.load(f)
    remap_spec_devices(cfg.get("spec") or {}, old, new)
    remap_host_sources(cfg.get("device_host_src") or [], old, new)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            spec = json.load(f)
        remap_spec_devices(spec, old, new)
        with open(spec_path, "w") as f:
            json.dump(spec, f)
