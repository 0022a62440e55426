"""Per-stage wall-clock timings, kept in the order the stages ran."""

from __future__ import annotations

import contextlib
import time


class Stages:
    """listener(name), if given, is told each stage as it starts (engine/intent.py)."""

    def __init__(self, listener=None):
        self.seconds: dict[str, float] = {}
        self.listener = listener

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.listener:
            self.listener(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}
