"""Docker through its Engine API (the `docker` SDK, imported on first use).

docker-py has no checkpoint calls, but its low-level client reaches every route of the
Engine API, so the checkpoint routes go through it too (no docker CLI is needed):

    POST   /containers/{id}/checkpoints        {CheckpointID, Exit, CheckpointDir}
    POST   /containers/{id}/start?checkpoint=  restore (the dir must be the container's own)
    DELETE /containers/{id}/checkpoints/{ck}

They exist only on an experimental daemon ("experimental": true in daemon.json).

What docker does not do, and gpusnap does here:
- docker saves no rootfs changes with a checkpoint: on overlay2 the container's upper
  dir is archived next to the images (rootfs-diff.tar) and unpacked into a new
  container's upper dir before it starts. A container left running is paused (the
  cgroup freezer, as `docker commit` does) while its upper dir is archived, so that no
  file is read mid-write; a guard process unpauses it should gpusnap die meanwhile.
- `start --checkpoint-dir` is refused ("custom checkpointdir is not supported"): a
  restore writes the images into <DockerRootDir>/containers/<id>/checkpoints/<ck>/.
- two restores of byte-identical dirs at once collide in containerd's content store
  ("content sha256:... already exists", moby#42900): every restore dir gets a nonce file,
  and that error is retried with backoff anyway.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time

from .. import interrupts, sysrun
from ..errors import ContainerEngineError, GpusnapError
from ..store import parallel
from .container_engine import ContainerEngine
from .devices import apply_node_changes, device_facts, engine_devices, mount_facts

RESTORE_MARKER = "gpusnap-restore"     # also read by hooks/gpusnap-criu-hook
CHECKPOINT_NAME = "gpusnap"
_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)
UNPAUSE_WAIT = 30.0     # seconds the guard has to unpause before it is killed


class DockerEngine(ContainerEngine):
    kind = "docker"

    def __init__(self, client=None):
        self._client = client
        self._info: dict | None = None

    # ---- connection ---------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            try:
                import docker
            except ImportError:
                raise ContainerEngineError("the docker Python SDK is missing",
                                           hint="pip install docker") from None
            try:
                self._client = docker.from_env(timeout=60)
            except Exception as e:  # noqa: BLE001 - DockerException and friends
                raise ContainerEngineError(f"cannot reach dockerd: {e}") from None
        return self._client

    @property
    def api(self):
        return self.client.api

    def info(self) -> dict:
        if self._info is None:
            try:
                self._info = self.client.info()
            except ContainerEngineError:
                raise
            except Exception as e:  # noqa: BLE001
                raise ContainerEngineError(f"dockerd did not answer: {str(e)[:200]}",
                                           hint="is dockerd running? "
                                                "(scripts/setup-containers.sh starts it)") from None
        return self._info

    def unavailable(self) -> str | None:
        if not (os.path.exists("/var/run/docker.sock") or os.environ.get("DOCKER_HOST")):
            return "no /var/run/docker.sock"
        try:
            self.info()
        except GpusnapError as e:
            return e.message
        return None

    def check_checkpoint_support(self) -> None:
        if not self.info().get("ExperimentalBuild"):
            raise ContainerEngineError(
                "dockerd is not in experimental mode: its checkpoint API is off",
                hint='set "experimental": true in /etc/docker/daemon.json and restart '
                     'dockerd (scripts/setup-containers.sh does both)')

    def _call(self, what: str, response, ok=(200, 201, 204)):
        if response.status_code in ok:
            return response
        try:
            message = response.json().get("message", "")
        except ValueError:
            message = response.text
        raise ContainerEngineError(f"docker {what}: {message.strip() or response.status_code}")

    # ---- facts ------------------------------------------------------------------------
    def inspect(self, ref: str) -> dict | None:
        import docker.errors
        try:
            return self.api.inspect_container(ref)
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as e:
            raise ContainerEngineError(f"docker inspect {ref}: {e.explanation or e}") from None

    def facts(self, info: dict) -> dict:
        cfg, host, state = info["Config"], info["HostConfig"], info["State"]
        graph = info.get("GraphDriver") or {}
        return {
            "engine": "docker", "engine_version": self.info().get("ServerVersion"),
            "id": info["Id"], "name": info["Name"].lstrip("/"),
            "image": cfg.get("Image"), "image_id": info.get("Image"),
            "cmd": cfg.get("Cmd") or [], "entrypoint": cfg.get("Entrypoint") or [],
            "env": cfg.get("Env") or [], "working_dir": cfg.get("WorkingDir") or "",
            "user": cfg.get("User") or "", "tty": bool(cfg.get("Tty")),
            "hostname": cfg.get("Hostname") or "",
            "mounts": mount_facts(info),
            "devices": device_facts(host.get("Devices")),
            "device_requests": host.get("DeviceRequests") or [],
            "storage_driver": graph.get("Name"),
            # what POST /containers/create takes to make this container again
            "create": {"Config": cfg, "HostConfig": host},
            "running": bool(state.get("Running")) and not state.get("Paused"),
            "status": state.get("Status"), "pid": int(state.get("Pid") or 0),
        }

    def state(self, ref: str) -> tuple[bool, int]:
        """(running, init pid); ContainerEngineError if the container is gone."""
        info = self.inspect(ref)
        if info is None:
            raise ContainerEngineError(f"docker container {ref} is gone")
        st = info["State"]
        return bool(st.get("Running")), int(st.get("Pid") or 0)

    def wait_stopped(self, ref: str, timeout: float = 30.0) -> None:
        """A checkpoint that stops the container returns while it is still stopping."""
        deadline = time.monotonic() + timeout
        while self.state(ref)[0]:
            if time.monotonic() > deadline:
                raise ContainerEngineError(f"docker container {ref} did not stop in {timeout:.0f} s")
            time.sleep(0.02)

    # ---- checkpoint -----------------------------------------------------------------
    def checkpoint(self, facts: dict, dest: str, work: str, leave_running: bool, *,
                   ignore_rootfs: bool = False) -> None:
        """CRIU images into dest/checkpoint/, the rootfs changes into dest/rootfs-diff.tar
        (not with ignore_rootfs)."""
        cid = facts["id"]
        staging = os.path.join(work, "docker-checkpoint")
        os.makedirs(staging, mode=0o700, exist_ok=True)
        body = {"CheckpointID": CHECKPOINT_NAME, "Exit": not leave_running,
                "CheckpointDir": staging}
        # no client timeout: a checkpoint of many GiB takes as long as it takes, and
        # giving up on the call would not stop dockerd from stopping the container
        self._call("checkpoint create", self.api._post_json(
            self.api._url("/containers/{0}/checkpoints", cid), data=body, timeout=None))
        if not leave_running:
            self.wait_stopped(cid)
        os.rename(os.path.join(staging, CHECKPOINT_NAME), os.path.join(dest, "checkpoint"))
        os.rmdir(staging)
        if ignore_rootfs:
            facts["rootfs_diff"] = False
            return
        with self._paused(cid) if leave_running else contextlib.nullcontext():
            facts["rootfs_diff"] = self._save_rootfs_diff(cid, os.path.join(dest, "rootfs-diff.tar"))

    @contextlib.contextmanager
    def _paused(self, cid: str):
        """The container frozen for the block (it runs on after a --leave-running
        checkpoint and may be writing files). The unpause is the guard's, a forked helper
        that does it when told to end, or when gpusnap dies (SIGTERM by PDEATHSIG). A
        container paused already is the user's to unpause: left as it is."""
        if ((self.inspect(cid) or {}).get("State") or {}).get("Paused"):
            yield
            return
        guard = _start_guard(cid) if parallel.fork_is_safe() else None
        try:
            self._call("pause", self.api._post(self.api._url("/containers/{0}/pause", cid)))
            yield
        finally:
            with interrupts.shielded():
                if guard is not None:
                    sysrun.end_helper(guard, UNPAUSE_WAIT)
                else:
                    self._unpause(self.api, cid)

    @staticmethod
    def _unpause(api, cid: str) -> None:
        """Unpause cid; a container not paused (409) or gone (404) is left as it is."""
        api._post(api._url("/containers/{0}/unpause", cid))

    def _upper_dir(self, ref: str) -> str | None:
        info = self.inspect(ref) or {}
        graph = info.get("GraphDriver") or {}
        upper = (graph.get("Data") or {}).get("UpperDir")
        if graph.get("Name") in ("overlay2", "overlay") and upper and os.path.isdir(upper):
            return upper
        return None

    def _save_rootfs_diff(self, cid: str, out: str) -> bool:
        upper = self._upper_dir(cid)
        if upper is None:
            return False
        res = sysrun.run(["tar", "--create", "--file", out, "--directory", upper,
                          "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sparse",
                          "--one-file-system", "."], timeout=3600)
        if not res.ok:
            raise ContainerEngineError(f"archiving the container's rootfs changes failed: "
                                       f"{res.stderr.strip()[-300:]}")
        return True

    def _load_rootfs_diff(self, cid: str, tar: str) -> None:
        upper = self._upper_dir(cid)
        if upper is None:
            raise ContainerEngineError("the new container has no overlay upper dir to "
                                       "unpack the rootfs changes into")
        res = sysrun.run(["tar", "--extract", "--file", tar, "--directory", upper,
                          "--numeric-owner", "--xattrs", "--xattrs-include=*",
                          "--preserve-permissions"], timeout=3600)
        if not res.ok:
            raise ContainerEngineError(f"unpacking the rootfs changes failed: "
                                       f"{res.stderr.strip()[-300:]}")

    # ---- restore ---------------------------------------------------------------------
    def checkpoints_dir(self, cid: str) -> str:
        root = self.info().get("DockerRootDir") or "/var/lib/docker"
        path = os.path.join(root, "containers", cid, "checkpoints")
        if not os.path.isdir(os.path.dirname(path)):
            raise ContainerEngineError(f"{os.path.dirname(path)} is not here: gpusnap must "
                                       f"run on the docker host, with its root dir")
        return path

    def create(self, facts: dict, name: str, devices: list[dict] | None) -> str:
        """A new, stopped container made like the recorded one (devices replaced)."""
        cfg = dict(facts["create"]["Config"])
        host = dict(facts["create"]["HostConfig"])
        if devices is not None:
            host["Devices"] = engine_devices(devices)
        body = dict(cfg, HostConfig=host)
        res = self._call("create", self.api._post_json(
            self.api._url("/containers/create"), data=body, params={"name": name}))
        return res.json()["Id"]

    def remove(self, ref: str) -> None:
        try:
            self.api.remove_container(ref, force=True)
        except Exception:  # noqa: BLE001 - best effort in an undo path
            pass

    def kill(self, ref: str) -> None:
        try:
            self.api.kill(ref)
        except Exception:  # noqa: BLE001
            pass

    def resume_from(self, facts: dict, tree: str) -> int:
        """Undo a checkpoint that stopped the container: start it again from the images
        just made (tree/checkpoint). Returns the new init pid."""
        images = os.path.join(tree, "checkpoint")
        return self.start_with(facts["id"], lambda dest: shutil.copytree(images, dest),
                               "undo")

    def start_with(self, cid: str, fill, marker: str | None = None) -> int:
        """fill(dest) writes the CRIU images into the container's checkpoints/<ck>/."""
        ck = f"gpusnap-{secrets.token_hex(6)}"
        ck_dir = os.path.join(self.checkpoints_dir(cid), ck)
        os.makedirs(os.path.dirname(ck_dir), mode=0o700, exist_ok=True)
        try:
            fill(ck_dir)
            # the nonce makes every restore dir unique in containerd's content store
            with open(os.path.join(ck_dir, RESTORE_MARKER), "w") as f:
                f.write(f"{marker or ''} {ck}\n")
            self._start_checkpoint(cid, ck)
        finally:
            self._delete_checkpoint(cid, ck, ck_dir)
        running, pid = self.state(cid)
        if not running or pid <= 0:
            raise ContainerEngineError(f"docker restored container {cid[:12]} is not running")
        return pid

    def _start_checkpoint(self, cid: str, ck: str) -> None:
        for delay in (*_RETRY_DELAYS, None):
            res = self.api._post(self.api._url("/containers/{0}/start", cid),
                                 params={"checkpoint": ck}, timeout=None)
            if res.status_code in (200, 204):
                return
            try:
                message = res.json().get("message", "")
            except ValueError:
                message = res.text
            if delay is not None and "already exists" in message and "content" in message:
                time.sleep(delay)          # moby#42900: a concurrent identical upload
                continue
            raise ContainerEngineError(f"docker start --checkpoint: {message.strip()}",
                                       hint="the CRIU log is restore.log under "
                                            "/var/lib/containerd/io.containerd.runtime.v2.task/moby/<id>/")

    def _delete_checkpoint(self, cid: str, ck: str, ck_dir: str) -> None:
        try:
            self.api._delete(self.api._url("/containers/{0}/checkpoints/{1}", cid, ck))
        except Exception:  # noqa: BLE001
            pass
        shutil.rmtree(ck_dir, ignore_errors=True)

    def restore(self, facts: dict, materialise, *, into: str | None, name: str,
                devices: list[dict] | None, node_changes, work: str,
                marker: str) -> dict:
        """Restore into the stopped container `into`, or into a new one called `name`.
        materialise(dest, prefix) writes the snapshot's files under prefix into dest."""
        created = None
        try:
            if into is None:
                created = cid = self.create(facts, name, devices)
                if facts.get("rootfs_diff"):
                    tar_dir = os.path.join(work, "rootfs")
                    materialise(tar_dir, "rootfs-diff.tar")
                    self._load_rootfs_diff(cid, os.path.join(tar_dir, "rootfs-diff.tar"))
                    shutil.rmtree(tar_dir, ignore_errors=True)
            else:
                cid = into

            def fill(dest):
                materialise(dest, "checkpoint/")
                if node_changes:
                    apply_node_changes(dest, node_changes)

            pid = self.start_with(cid, fill, marker)
        except BaseException:
            if created:
                self.remove(created)
            raise
        info = self.inspect(cid) or {}
        return {"engine": "docker", "id": cid, "name": (info.get("Name") or name).lstrip("/"),
                "pid": pid, "created": created is not None}



def _start_guard(cid: str) -> int:
    """The unpause guard, forked; returns once it listens for SIGTERM (a SIGTERM before
    that would end it without the unpause)."""
    r, w = os.pipe()
    try:
        pid = sysrun.fork_helper(_unpause_guard, cid, os.getpid(), w)
        os.close(w)
        w = -1
        os.read(r, 1)                       # b"" too when it failed before it was ready
        return pid
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _unpause_guard(cid: str, parent: int, ready: int) -> None:  # pragma: no cover - helper
    """In a forked helper: wait until told to end (or gpusnap died), then unpause cid
    with a client of its own (the parent's connection is not shared across the fork)."""
    stop = sysrun.stop_on_sigterm(parent)
    os.write(ready, b"R")
    os.close(ready)
    while not stop.wait(1.0):
        pass
    import docker
    DockerEngine._unpause(docker.from_env(timeout=UNPAUSE_WAIT).api, cid)
