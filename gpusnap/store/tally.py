"""What an ingest stored: each chunk counted once, however many pieces name it."""

from __future__ import annotations


class Tally:
    """bytes_stored and bytes_new of one ingest. Workers in separate processes may each
    find the same new chunk and send it (each process claims it only for itself): it is
    new once, stored once."""

    def __init__(self):
        self.sizes: dict[str, int] = {}         # chunk id -> stored size
        self.fresh: dict[str, int] = {}         # chunk id -> bytes sent, where it was new

    def add(self, cid: str, stored: int, new: int) -> None:
        self.sizes.setdefault(cid, stored)
        if new:
            self.fresh.setdefault(cid, new)

    @property
    def stored(self) -> int:
        return sum(self.sizes.values())

    @property
    def new(self) -> int:
        return sum(self.fresh.values())
