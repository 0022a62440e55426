"""GPUSNAP_TEST_PAUSE=POINT:FILE, for the fault tests: the gpusnap process that reaches POINT
creates FILE and waits there (120 s), to be killed or signalled while it is exactly there.

POINT is a stage a dump or restore records as it enters it (engine/intent.py), or one of
the points inside a stage that a signal aimed by time could miss:

    pages_stream   dump: CRIU's first pages have come in; gpusnap reads no more of the
                   stream until it moves on (CRIU waits on the socket, the tree held)
    ingest_batch   each ingest worker once it has stored its first batch of chunks; the
                   batches after it stay queued

Imports nothing of gpusnap: the store's workers and the engine both call it.
"""

from __future__ import annotations

import os
import time

ENV = "GPUSNAP_TEST_PAUSE"
WAIT = 120.0


def wanted(point: str) -> str | None:
    """The file to create when GPUSNAP_TEST_PAUSE names point, else None."""
    want, _, mark = os.environ.get(ENV, "").partition(":")
    return mark if want == point and mark else None


def pause(point: str) -> None:
    """Create the file and wait, when GPUSNAP_TEST_PAUSE names point."""
    mark = wanted(point)
    if mark:
        with open(mark, "w"):
            pass
        time.sleep(WAIT)
