"""Ctrl-C and SIGTERM while gpusnap must not be cut short: the one deferral policy.

    held()      SIGINT and SIGTERM that arrive inside the block are noted, not acted on;
                when the block ends, the first one goes to the handler that was in place
                before (Ctrl-C: KeyboardInterrupt; SIGTERM under the CLI: Interrupted), so
                the caller's undo starts from a known state. Around a child process
                (sysrun.run: a CRIU cut short can leave its parasite in the target) and
                an engine call that changes a container (a checkpoint in dockerd).
    shielded()  the same, but what arrived is dropped: an undo or a clean-up runs to its
                end (gpusnap is already unwinding for the first signal, or about to exit).
                `.interrupted` says afterwards whether one came.

A handler that is not Python's (SIG_DFL, None) counts as Ctrl-C's: the deferred signal is
raised as KeyboardInterrupt, so that the undo still runs; SIG_IGN drops it. Blocks nest:
an inner held() hands its signal to the outer one when it ends. Signals reach only the
main thread, so off it both are no-ops.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Deferred:
    """The signals noted during a held() or shielded() block, in arrival order."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    @property
    def interrupted(self) -> bool:
        return bool(self.signals)

    def _note(self, signum, frame) -> None:
        self.signals.append(signum)


@contextlib.contextmanager
def _deferring() -> Iterator[tuple[Deferred, dict]]:
    """Note SIGINT/SIGTERM during the block; yields (what came, the handlers before)."""
    deferred = Deferred()
    if threading.current_thread() is not threading.main_thread():
        yield deferred, {}
        return
    previous = {sig: signal.signal(sig, deferred._note) for sig in SIGNALS}
    try:
        yield deferred, previous
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _deliver(signum: int, handler) -> None:
    """What the signal would have done had it not been deferred."""
    if handler == signal.SIG_IGN:
        return
    if callable(handler):
        handler(signum, None)
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def held() -> Iterator[Deferred]:
    with _deferring() as (deferred, previous):
        yield deferred
    if deferred.signals and previous:
        first = deferred.signals[0]
        _deliver(first, previous[first])


@contextlib.contextmanager
def shielded() -> Iterator[Deferred]:
    with _deferring() as (deferred, _):
        try:
            yield deferred
        except KeyboardInterrupt:
            # one raised inside the block by a held() that ended there: dropped too
            deferred.signals.append(signal.SIGINT)
