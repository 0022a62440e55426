"""What takes the CRIU images of a target, chosen by its kind; dump.py orders the steps.

    dump(images, logs, leave_running)   write the images under `images`
    criu_dir(images)                    where the CRIU image files are inside `images`
    finish()                            the snapshot is committed: the original goes
    resume(cuda)                        undo a dump that stopped the original

A process tree is dumped by gpusnap's own CRIU, left stopped (not killed) until the
snapshot is committed; resume is SIGCONT, to the processes that were not stopped already
before the dump (a tree someone SIGSTOP'd stays stopped, as it was found). A container is checkpointed by its engine so
that the engine's own state stays consistent (docker/podman know it exited from a
checkpoint); a checkpoint that stops it really stops it, so resume starts it again from
the images just taken, then restores and unlocks the CUDA processes inside it, which
come back CHECKPOINTED under new host pids.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading

import psutil

from ..criu import runner as criu_runner
from ..errors import CriuFailed, GpusnapError, TargetNotFound
from ..targets.process import kill_and_wait, tree_pids


@contextlib.contextmanager
def hold_interrupts():
    """Let an engine call that must not be cut (a checkpoint, a restore in progress in
    dockerd) finish: SIGINT/SIGTERM are noted meanwhile and raised as KeyboardInterrupt
    once it returns, so the caller's undo runs on a known state."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []

    def note(signum, frame):
        caught.append(signum)

    old = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def unwinding():
    """An undo or a clean-up runs to its end: a second Ctrl-C or SIGTERM meanwhile is
    dropped (gpusnap is already unwinding for the first, or about to exit)."""
    try:
        with hold_interrupts():
            yield
    except KeyboardInterrupt:
        pass


def for_plan(plan, cuda=None):
    if plan.target.kind == "process":
        return ProcessCheckpointer(plan)
    return ContainerCheckpointer(plan, cuda)


class ProcessCheckpointer:
    stage = "criu_dump"

    def __init__(self, plan):
        self.target = plan.target
        self.options = plan.criu_options
        self.undo_errors: list[str] = []
        self.stopped_before = {pid for pid in self.target.pids if _status(pid) == psutil.STATUS_STOPPED}

    def dump(self, images: str, logs: str, leave_running: bool) -> None:
        leave = "running" if leave_running else "stopped"
        try:
            criu_runner.dump(self.target.root_pid, images, self.options, leave=leave)
            if not leave_running:
                self._refresh_pids()        # frozen now: exactly the tree in the images
        except BaseException as exc:
            # CRIU may have stopped the tree before it failed, or before an interrupt that
            # waited for it (sysrun): dump.py resumes only after a dump that returned.
            if not leave_running:
                self._refresh_pids()
                self.resume(None)
            root = self.target.root_pid
            if isinstance(exc, CriuFailed) and _status(root) in (None, psutil.STATUS_ZOMBIE):
                raise TargetNotFound(f"process {root} exited during the dump") from None
            raise
        finally:
            if os.path.exists(os.path.join(images, "dump.log")):
                shutil.move(os.path.join(images, "dump.log"), os.path.join(logs, "dump.log"))

    def _refresh_pids(self) -> None:
        """The tree as CRIU saw it: children forked after plan() (during an SDK prepare
        or the CUDA lock) are stopped with the rest, so they must be killed, resumed and
        recorded with it."""
        try:
            now = tree_pids(self.target.root_pid)
        except psutil.NoSuchProcess:
            return
        self.target.pids = sorted(set(self.target.pids) | set(now), key=lambda p: (p != self.target.root_pid, p))

    def criu_dir(self, images: str) -> str:
        return images

    def finish(self) -> None:
        kill_and_wait(self.target.pids)

    def resume(self, cuda) -> None:
        for pid in self.target.pids:
            if pid in self.stopped_before:
                continue
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def _status(pid: int) -> str | None:
    """psutil's status of pid, or None when it is gone."""
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return None


class ContainerCheckpointer:
    stage = "engine_checkpoint"

    def __init__(self, plan, cuda=None):
        from ..targets import containers
        self.target = plan.target
        self.facts = plan.target.container
        self.engine = containers.get_engine(plan.target.kind)
        self.cuda = cuda
        self.images: str | None = None
        self.undo_errors: list[str] = []

    def dump(self, images: str, logs: str, leave_running: bool) -> None:
        self.images = images
        work = os.path.dirname(images)
        try:
            with hold_interrupts():
                self.engine.checkpoint(self.facts, images, work, leave_running)
        except BaseException:
            # The engine resumes the container when the checkpoint fails; if it stopped
            # it anyway and the images are whole, start it again from them.
            if not leave_running and self._stopped() and self._images_whole():
                self.resume(self.cuda)
            raise

    def _stopped(self) -> bool:
        try:
            return not self.engine.state(self.facts["id"])[0]
        except GpusnapError:
            return False

    def _images_whole(self) -> bool:
        return bool(self.images) and os.path.exists(
            os.path.join(self.images, "checkpoint", "inventory.img"))

    def criu_dir(self, images: str) -> str:
        return os.path.join(images, "checkpoint")

    def finish(self) -> None:
        """The engine stopped the container at the checkpoint; it stays as it is (a
        stopped container that `gpusnap restore` can restore into)."""

    def resume(self, cuda) -> None:
        """Never raises: what failed is kept in undo_errors."""
        try:
            with hold_interrupts():
                pid = self.engine.resume_from(self.facts, self.images)
        except BaseException as e:  # noqa: BLE001 - an undo reports, it does not raise
            self.undo_errors.append(f"the container could not be started again from its "
                                    f"checkpoint: {getattr(e, 'message', e)}")
            return
        if cuda:
            cuda.release()          # the old pids are gone; the new ones are handled here
            try:
                restore_container_cuda(pid, None, required=False)
            except BaseException as e:  # noqa: BLE001
                self.undo_errors.append(f"CUDA restore in the restarted container failed: "
                                        f"{getattr(e, 'message', e)}")


def restore_container_cuda(init_pid: int, pairs, required: bool = True) -> list[int]:
    """Restore and unlock the CUDA processes of a container just restored (their host
    pids are new: found as the container's pids the driver reports CHECKPOINTED or
    LOCKED). Returns those pids. required: none found is an error (else: a CRIU action
    script already did it)."""
    from ..cuda import CudaState, discover, get_driver
    from ..errors import CudaFailed
    from ..targets.containers import container_pids
    from . import gpu
    driver = get_driver()
    pids = [p for p in discover.cuda_pids(container_pids(init_pid), driver)
            if driver.get_state(p) in (CudaState.CHECKPOINTED, CudaState.LOCKED)]
    if not pids and not required:
        return []
    if not pids:
        raise CudaFailed("the restored container has no checkpointed CUDA process",
                         hint="was the CUDA state already restored (a CRIU action script)?")
    session = gpu.session(pids)
    session.restore_all(pairs)
    session.unlock_all()
    return pids
