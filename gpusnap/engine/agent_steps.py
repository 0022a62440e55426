"""Cooperating servers (gpusnap.sdk): their weights leave the snapshot and are read back
from their files after a restore. dump.py and restore.py call in here; servers without
an agent see no difference.

Dump (DumpAgents):
    prepare()      before the CUDA lock: every process of the tree that runs an agent is
                   asked to drop its registered tensors (30 s each, in parallel). Any
                   agent failing: those that did prepare are resumed and the dump goes on
                   in transparent mode (a note; the manifest's sdk is null).
    resume()       after a --leave-running dump, once CUDA runs again.
    undo()         any failure after prepare, Ctrl-C included: resume (the server never
                   stays without its weights). Never raises.
    record()       the manifest's `sdk` (model.SdkRecord): {agents: [{pid, socket, uid, weight_files,
                   bytes_out_of_image, ...}], bytes_out_of_image}.
Restore:
    check_weights()       in plan(), before anything is restored: every recorded weight
                          file must be as it was (size, mtime_ns, header, content hash).
    prepare_socket_dirs() before CRIU restore: CRIU re-binds the agent's listening socket
                          to its path; it unlinks a stale socket file itself, but fails
                          when the directory is gone (a reboot empties /run).
    resume()              after CRIU restore -> CUDA restore -> unlock.

An agent is found as a listening unix socket named agent-<pid>.sock that the pid itself
holds open (/proc/PID/fd against /proc/PID/net/unix), wherever the server put it; a stale
file from a dead process is therefore never taken for an agent. Only process targets:
in a container the socket path is in the container's mount namespace (not done yet; an
agent found there is left alone with a note).
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor

from ..errors import AgentFailed, WeightsChanged
from ..model import Manifest, SdkAgent, SdkRecord, WeightFile
from ..sdk import protocol
from ..sdk.protocol import AgentError, request
from ..sdk.safetensors import identity_changes
from ..targets import fds

PREPARE_TIMEOUT_S = 30.0


def resume_timeout() -> float:
    try:
        return float(os.environ.get("GPUSNAP_SDK_RESUME_TIMEOUT", "600"))
    except ValueError:
        return 600.0


def parse_net_unix(text: str) -> list[tuple[int, int, str]]:
    """(inode, flags, path) of each bound unix socket in /proc/PID/net/unix. Pure."""
    out = []
    for line in text.splitlines()[1:]:
        cols = line.split(None, 7)
        if len(cols) < 8:
            continue
        try:
            out.append((int(cols[6]), int(cols[3], 16), cols[7]))
        except ValueError:
            continue
    return out


SO_ACCEPTCON = 0x10000          # the "listening" flag in /proc/net/unix


def find_agents(pids: list[int]) -> dict[int, str]:
    """pid -> socket path, for each pid that listens on its own agent-<pid>.sock."""
    found = {}
    for pid in pids:
        inodes = fds.socket_inodes([pid])
        if not inodes:
            continue
        try:
            with open(f"/proc/{pid}/net/unix") as f:
                table = parse_net_unix(f.read())
        except OSError:
            continue
        for inode, flags, path in table:
            if (inode in inodes and flags & SO_ACCEPTCON and path.startswith("/")
                    and os.path.basename(path) == f"agent-{pid}.sock"):
                try:
                    if stat.S_ISSOCK(os.stat(path).st_mode):
                        found[pid] = path
                        break
                except OSError:
                    continue
    return found


def process_uid(pid: int) -> int | None:
    """The effective uid of pid (what SO_PEERCRED reports of its sockets), None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _all(calls: dict[int, tuple], timeout: float, tree: list[int],
         uids: dict[int, int | None]) -> tuple[dict[int, dict], dict[int, str]]:
    """Send (path, cmd) to every pid's agent at once; (replies, errors) by pid. Each
    agent must be listened to by a pid of tree, as its pid's uid (protocol.request),
    else nothing is sent to it."""
    if not calls:
        return {}, {}
    replies, errors = {}, {}
    with ThreadPoolExecutor(len(calls)) as ex:
        futs = {pid: ex.submit(request, path, cmd, timeout, pids=tree, uid=uids.get(pid))
                for pid, (path, cmd) in calls.items()}
        for pid, fut in futs.items():
            try:
                replies[pid] = fut.result()
            except AgentError as e:
                errors[pid] = str(e)
    return replies, errors


STATUS_TIMEOUT_S = 5.0


def releasing_collectives(ranks: list[int], tree: list[int]) -> set[int]:
    """The ranks whose SDK agent says (status: collectives) that it tears its
    communicators down before a checkpoint (gpusnap.sdk.collectives)."""
    agents = find_agents(ranks)
    if not agents:
        return set()
    uids = {pid: process_uid(pid) for pid in agents}
    replies, _ = _all({pid: (path, "status") for pid, path in agents.items()},
                      STATUS_TIMEOUT_S, tree, uids)
    return {pid for pid, reply in replies.items() if reply.get("collectives")}


class DumpAgents:
    """ask: whether this kind of target has its agents asked (containers: not yet, their
    sockets are in the container's mount namespace). required: pids whose agent must
    prepare and tear its communicators down (NCCL ranks spared by the refusal): if one
    does not, the others are resumed and AgentFailed is raised before anything is
    locked, instead of going on in transparent mode."""

    def __init__(self, target, ask: bool = True, required: list[int] = ()):
        self.target = target
        self.ask = ask
        self.required = set(required)
        self.asked: dict[int, str] = {}         # pid -> socket: sent prepare (answered or not)
        self.uids: dict[int, int | None] = {}   # pid -> its uid, when its agent was found
        self.prepared: dict[int, dict] = {}     # pid -> prepare's reply
        self.resumed = False
        self.notes: list[str] = []

    def prepare(self, stages) -> None:
        agents = find_agents(self.target.pids)
        if self.required - set(agents):
            raise AgentFailed(f"the SDK agents of NCCL ranks {sorted(self.required - set(agents))} "
                              f"are gone: nothing was locked")
        if not agents:
            return
        if not self.ask:
            self.notes.append(f"SDK agents in pids {sorted(agents)} left alone: containers are "
                              f"dumped in transparent mode (weights in the image)")
            return
        self.asked = dict(agents)
        self.uids = {pid: process_uid(pid) for pid in agents}
        with stages.stage("sdk_prepare"):
            replies, errors = self._all("prepare", PREPARE_TIMEOUT_S)
        self._insist_on_collectives(replies, errors)
        if errors:
            for pid, err in sorted(errors.items()):
                self.notes.append(f"the SDK agent of pid {pid} did not prepare ({err}): dumped in "
                                  f"transparent mode, weights in the image")
            undo_errors = self.undo()
            self.notes += undo_errors
            self.asked = {}
            return
        self.prepared = replies

    def _insist_on_collectives(self, replies: dict, errors: dict) -> None:
        """A required rank whose agent did not tear its communicators down: undo, raise."""
        missing = sorted(pid for pid in self.required
                         if pid in errors or not replies.get(pid, {}).get("collectives"))
        if not missing:
            return
        why = "; ".join(errors.get(pid, f"pid {pid}: no teardown reported") for pid in missing)
        undo_errors = self.undo()
        raise AgentFailed(f"NCCL ranks {missing} did not tear their communicators down ({why}): "
                          f"nothing was locked", hint="; ".join(undo_errors) or
                          "retry, or start the ranks with NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0")

    def _all(self, cmd: str, timeout: float):
        return _all({p: (s, cmd) for p, s in self.asked.items()}, timeout, self.target.pids, self.uids)

    def record(self) -> SdkRecord | None:
        """The manifest's `sdk`: what each agent that prepared reported."""
        if not self.prepared:
            return None
        agents = [SdkAgent(pid=pid, socket=self.asked[pid], uid=r.get("uid"),
                           tensors=r.get("tensors"),
                           weight_files=[WeightFile.from_json(w, f"agent {pid}: weight file")
                                         for w in r.get("files", [])],
                           bytes_out_of_image=r.get("bytes_dropped", r.get("bytes", 0)),
                           gpu_bytes_released=r.get("bytes_released"),
                           backend=r.get("backend"))
                  for pid, r in sorted(self.prepared.items())]
        return SdkRecord(agents, sum(a.bytes_out_of_image for a in agents))

    def resume(self, stages) -> None:
        """After a --leave-running dump. Raises AgentFailed (the caller's undo retries)."""
        if not self.asked or self.resumed:
            return
        with stages.stage("sdk_resume"):
            _, errors = self._all("resume", resume_timeout())
        if errors:
            raise AgentFailed("; ".join(errors.values()),
                              hint="the server's weights are not back in GPU memory")
        self.resumed = True

    def undo(self) -> list[str]:
        """Resume every agent that was sent prepare. Never raises; what failed is returned."""
        if not self.asked or self.resumed:
            return []
        try:
            _, errors = self._all("resume", resume_timeout())
        except BaseException as e:  # noqa: BLE001 - an undo reports, it does not raise
            errors = {0: str(e)}
        if not errors:
            self.resumed = True
        return [f"the server's weights could not be read back: {e}" for e in errors.values()]


# ---- restore -----------------------------------------------------------------------

def check_weights(manifest: Manifest) -> None:
    """Refuse, before anything is restored, when a weight file the agents will reload
    from is not the file they dropped."""
    if not manifest.sdk:
        return
    changes = []
    for agent in manifest.sdk.agents:
        for f in agent.weight_files:
            changes += identity_changes(f.to_json())
    if changes:
        raise WeightsChanged("the snapshot's weights are read back from their files, and "
                             + "; ".join(changes[:5]),
                             hint="put the original files back, or dump again from a server "
                                  "that loaded the new ones")


def prepare_socket_dirs(manifest: Manifest) -> None:
    if not manifest.sdk:
        return
    for agent in manifest.sdk.agents:
        d = os.path.dirname(agent.socket)
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o700, exist_ok=True)
            uid = agent.uid
            # A server's own socket dir goes back to it; the shared default dir
            # (/run/gpusnap) never leaves root.
            if uid not in (None, 0) and os.path.realpath(d) != os.path.realpath(protocol.DEFAULT_DIR):
                os.chown(d, uid, -1)


def resume(manifest: Manifest, stages) -> dict | None:
    """Read the weights back into the restored server; raises AgentFailed."""
    return resume_agents(manifest.sdk, manifest.pids, stages)


def resume_agents(sdk: SdkRecord | None, pids: list[int], stages) -> dict | None:
    """Have the agents of sdk (in the tree of pids) read their weights back."""
    if not sdk:
        return None
    with stages.stage("sdk_resume"):
        replies, errors = _all({a.pid: (a.socket, "resume") for a in sdk.agents},
                               resume_timeout(), pids, {a.pid: a.uid for a in sdk.agents})
    if errors:
        raise AgentFailed("the restored server did not read its weights back: "
                          + "; ".join(errors.values()))
    total = sum(r.get("bytes", 0) for r in replies.values())

    def slowest(key: str) -> float:
        return max((r.get(key) or 0) for r in replies.values()) if replies else 0
    secs = slowest("read_seconds")
    return {"bytes": total, "read_seconds": secs, "alloc_seconds": slowest("alloc_seconds"),
            "verify_seconds": slowest("verify_seconds"), "seconds": slowest("seconds"),
            "gbps": round(total / secs / 1e9, 3) if secs else None,
            "readers": sorted({r.get("reader", "?") for r in replies.values()})}
