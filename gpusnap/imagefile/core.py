"""CRIU core images: the one fact gpusnap needs, whether a task was stopped at the dump.

    CORE_IMAGE ::= COMMON_MAGIC CORE_MAGIC CORE_ENTRY
    CORE_ENTRY ::= core_entry { 1: mtype enum, 2: thread_info, 3: tc TASK_CORE, 5: thread_core, ... }
    TASK_CORE  ::= task_core_entry { 1: task_state u32, 2: exit_code u32, ... }
    task_state: TASK_ALIVE=1, TASK_DEAD=2, TASK_STOPPED=3, TASK_HELPER=4, TASK_THREAD=5,
                TASK_ZOMBIE=6

Files: core-<tid>.img, one per thread; a thread's has no tc (its leader's says).
"""

from __future__ import annotations

from typing import BinaryIO

from . import image
from .protobuf import decode_fields

CORE_MAGIC = 0x55053847
TASK_ALIVE, TASK_STOPPED = 1, 3


def task_state(f: BinaryIO) -> int | None:
    """The task_state of a process's core image; None for a thread's (no tc)."""
    if image.read_magic(f) != CORE_MAGIC:
        raise ValueError("not a core image")
    payload = next(image.entries(f), None)
    if payload is None:
        raise ValueError("core image has no entry")
    tc = decode_fields(payload).get(3)
    if not isinstance(tc, bytes):
        return None
    return int(decode_fields(tc).get(1, 0))
