"""What a dump acts on: a process tree, or a Docker or Podman container."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .fields import Fields, invalid, pid, string

KINDS = ("process", "docker", "podman")


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

    def to_json(self) -> dict:
        return asdict(self)

    to_dict = to_json

    @classmethod
    def from_json(cls, f: Fields) -> "Target":
        kind = f.str("kind")
        if kind not in KINDS:
            raise invalid(f.at("kind"), " or ".join(map(repr, KINDS)))
        return cls(kind=kind, root_pid=f.int("root_pid", minimum=1),
                   pids=f.list("pids", pid, list), name=f.str("name", None),
                   cmdline=f.list("cmdline", string, list),
                   shell_job=f.bool("shell_job", False), container=f.object("container", dict))
