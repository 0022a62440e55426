"""A seed: a model's weights put into the store before its server's first dump
(docs/design.md, "seeds/<seed-id>.json"). Attribute = JSON key, validated on read."""

from __future__ import annotations

from dataclasses import dataclass, field

from .fields import Fields, hex_str, invalid, string
from .manifest import ZERO_ID, FileEntry

SEED_VERSION = 1


@dataclass
class Seed:
    """The chunks a `gpusnap seed add` stored: a FileEntry a weights file (path: its base
    name; size: the bytes of its tensors' whole pages, what the chunks hold), kept from gc
    as a snapshot's are. `sources`: the absolute paths read, for people."""
    id: str
    files: list[FileEntry]
    created: str = ""
    name: str | None = None
    sources: list[str] = field(default_factory=list)
    format: int = SEED_VERSION

    def to_json(self) -> dict:
        return {"format": self.format, "id": self.id, "created": self.created, "name": self.name,
                "sources": list(self.sources), "files": [f.to_json() for f in self.files]}

    @classmethod
    def from_json(cls, data) -> "Seed":
        f = Fields(data, "seed")
        version = f.int("format")
        if version != SEED_VERSION:
            raise invalid(f.at("format"), str(SEED_VERSION), version)
        files = f.list("files", lambda v, w: FileEntry.from_json(v, w))
        return cls(id=hex_str(f.raw("id"), f.at("id"), length=16), files=files,
                   created=f.str("created", ""), name=f.str("name", None),
                   sources=f.list("sources", string, list), format=version)

    def chunk_sizes(self) -> dict[str, int]:
        """Distinct non-zero chunk id -> plain size."""
        return {cid: n for entry in self.files for cid, n in entry.chunks if cid != ZERO_ID}

    @property
    def bytes_seeded(self) -> int:
        return sum(entry.size for entry in self.files)
