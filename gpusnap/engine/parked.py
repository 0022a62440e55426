"""What gpusnap holds on this host: one small JSON file per target, STATE_DIR/<pid>.json.

    suspended   `gpusnap suspend`: alive, its CUDA state checkpointed into host memory
    standby     `gpusnap restore --standby`: restored by CRIU, CUDA still checkpointed
    restored    `gpusnap restore`: a tree restored from a snapshot (for `gpusnap ps`)

Written atomically (paths.replace_file) and removed by `gpusnap resume` (a standby that
resumes becomes `restored`). An entry keeps its process's start time, so one whose pid
is gone or was reused is recognised and dropped when the entries are listed.
The directory is /run/gpusnap/state (tmpfs: empty after a reboot, as the processes are),
or GPUSNAP_STATE_DIR.
"""

from __future__ import annotations

import json
import os

from ..errors import GpusnapError
from ..paths import private_dir, replace_file
from ..targets.process import started

DEFAULT_DIR = "/run/gpusnap/state"
PARKED = ("suspended", "standby")


def state_dir() -> str:
    return private_dir(os.environ.get("GPUSNAP_STATE_DIR") or DEFAULT_DIR, "state directory")


def record(entry: dict) -> dict:
    """Write entry (it has 'pid' and 'state'); its start time is added."""
    entry = dict(entry, started=started(entry["pid"]))
    path = os.path.join(state_dir(), f"{entry['pid']}.json")
    replace_file(path, json.dumps(entry, indent=1, sort_keys=True).encode())
    return entry


def record_quietly(entry: dict, notes: list[str]) -> None:
    """record() for an entry only `gpusnap ps` reads: a failure is a note, not an error."""
    try:
        record(entry)
    except (OSError, GpusnapError) as e:
        notes.append(f"not listed by gpusnap ps: {getattr(e, 'message', e)}")


def put_back(pid: int, entry: dict | None, notes: list[str]) -> None:
    """Undo a record() of pid's entry: the entry it replaced is written again, or, where
    there was none, pid's entry goes. Never raises: a failure is a note."""
    if entry is not None:
        record_quietly(entry, notes)
        return
    try:
        forget(pid)
    except (OSError, GpusnapError) as e:
        notes.append(f"gpusnap ps may list pid {pid} as parked: {getattr(e, 'message', e)}")


def forget(pid: int) -> None:
    try:
        os.unlink(os.path.join(state_dir(), f"{pid}.json"))
    except FileNotFoundError:
        pass


def _alive(entry: dict) -> bool:
    now = started(entry["pid"])
    return now is not None and (entry.get("started") is None or
                                abs(now - entry["started"]) < 0.05)


def entries() -> list[dict]:
    """Every entry whose process is still the one recorded; the others are removed."""
    out = []
    base = state_dir()
    for name in sorted(os.listdir(base)):
        if not name.endswith(".json") or not name[:-5].isdigit():
            continue
        try:
            with open(os.path.join(base, name)) as f:
                entry = json.load(f)
        except (OSError, ValueError):
            continue
        if _alive(entry):
            out.append(entry)
        else:
            forget(int(name[:-5]))
    return sorted(out, key=lambda e: e["pid"])


def lookup(pid: int | None = None, container: str | None = None) -> dict | None:
    """The live entry of a root pid, or of a container named by name or id (prefix)."""
    for entry in entries():
        if pid is not None and entry["pid"] == pid:
            return entry
        c = entry.get("container") or {}
        if container and (container == c.get("name") or
                          (len(container) >= 4 and str(c.get("id", "")).startswith(container))):
            return entry
    return None
