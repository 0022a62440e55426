"""Facts passed between layers: plain data, no behaviour that touches the system."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Target:
    """What a dump acts on, whatever named it (a pid, a Docker or Podman container)."""
    kind: str                      # "process" | "docker" | "podman"
    root_pid: int
    pids: list[int]
    name: str | None = None        # container name, or the process's comm
    cmdline: list[str] = field(default_factory=list)
    shell_job: bool = False        # root is not a session leader: CRIU needs --shell-job
    container: dict = field(default_factory=dict)   # engine facts (image, config, mounts...)

    def to_dict(self) -> dict:
        return asdict(self)
