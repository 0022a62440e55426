"""What gpusnap asks of a container engine; docker_engine and podman_engine implement it.

facts (the dict facts() returns, recorded in the manifest as target.container) is what a
restore needs to rebuild the container: engine, id, name, image, command, environment,
mounts, devices and, for docker, the raw create body.
"""

from __future__ import annotations

from typing import Callable, Protocol

from ..imagefile.devnodes import NodeChange

# materialise(dest, prefix): the snapshot's files under prefix written into dest
Materialise = Callable[[str, str], None]


class ContainerEngine(Protocol):
    kind: str                       # "docker" | "podman"

    def unavailable(self) -> str | None:
        """Why the engine cannot be used here, or None."""

    def check_checkpoint_support(self) -> None:
        """Raise ContainerEngineError (with the fix) if it cannot checkpoint."""

    def inspect(self, ref: str) -> dict | None:
        """The engine's inspect of a container by name or id, None if it has none."""

    def facts(self, info: dict) -> dict:
        """The manifest's facts from an inspect, plus running, status and pid."""

    def state(self, ref: str) -> tuple[bool, int]:
        """(running, init pid); ContainerEngineError if the container is gone."""

    def checkpoint(self, facts: dict, dest: str, work: str, leave_running: bool, *,
                   ignore_rootfs: bool = False) -> None:
        """CRIU images into dest/checkpoint/, the rest the engine needs next to them
        (ignore_rootfs: without the container's filesystem changes)."""

    def resume_from(self, facts: dict, tree: str) -> int:
        """Undo a checkpoint that stopped the container (images under tree); new init pid."""

    def restore(self, facts: dict, materialise: Materialise, *, into: str | None, name: str,
                devices: list[dict] | None, node_changes: list[NodeChange], work: str,
                marker: str) -> dict:
        """Restore into the stopped container `into`, or as a new one called `name`:
        {engine, id, name, pid, created}."""

    def remove(self, ref: str) -> None:
        """Remove the container, best effort (an undo)."""

    def kill(self, ref: str) -> None:
        """Kill the container, best effort (an undo)."""
