"""Facts passed between layers: plain data, no behaviour that touches the system.

target.py    Target: what a dump acts on
manifest.py  Manifest and its parts: a snapshot as the store keeps it, validated on read
seed.py      Seed: a model's weights stored ahead of a first dump
fields.py    typed reads from parsed JSON (one clear error per wrong shape)
"""

from .manifest import (MANIFEST_VERSION, ZERO_ID, CriuFacts, CudaFacts, FileEntry, Manifest,
                       SdkAgent, SdkRecord, WeightFile)
from .seed import Seed
from .target import Target

__all__ = ["Target", "Manifest", "FileEntry", "CriuFacts", "CudaFacts", "SdkRecord", "SdkAgent",
           "WeightFile", "MANIFEST_VERSION", "ZERO_ID", "Seed"]
