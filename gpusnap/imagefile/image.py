"""CRIU image container format.

    IMAGE  ::= [ COMMON_MAGIC | SERVICE_MAGIC ] MAGIC { ENTRY }
    ENTRY  ::= SIZE:u32le PAYLOAD:protobuf[SIZE]

All u32 little-endian. Raw images (pages-*.img) have no header and are not read here.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
PAGEMAP_MAGIC = 0x56084025


def read_magic(f: BinaryIO) -> int:
    magic = _u32(f)
    if magic in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC):
        magic = _u32(f)
    return magic


def entries(f: BinaryIO) -> Iterator[bytes]:
    while True:
        head = f.read(4)
        if not head:
            return
        if len(head) != 4:
            raise ValueError("truncated entry size")
        (size,) = struct.unpack("<I", head)
        payload = f.read(size)
        if len(payload) != size:
            raise ValueError("truncated entry")
        yield payload


def write_entry(f: BinaryIO, payload: bytes) -> None:
    f.write(struct.pack("<I", len(payload)) + payload)


def write_entries(f: BinaryIO, payloads) -> None:
    """write_entry of each payload, in one write."""
    f.write(b"".join(b for payload in payloads for b in (struct.pack("<I", len(payload)), payload)))


def _u32(f: BinaryIO) -> int:
    data = f.read(4)
    if len(data) != 4:
        raise ValueError("truncated image header")
    return struct.unpack("<I", data)[0]
