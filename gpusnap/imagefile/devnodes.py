"""Device nodes in CRIU's tmpfs images: move a node to another device number.

CRIU dumps the content of every tmpfs mount of a container, /dev included, as a gzipped
tar (tmpfs-dev-<mnt id>.tar.gz.img) and restores it with `tar --extract`. The device
nodes a runtime created in the container's /dev (docker --device, podman --device) are
therefore restored from the image, with the major:minor they had at dump time, whatever
the new container's spec says. Restoring a container onto another GPU (host /dev/nvidia1
in place of /dev/nvidia0) rewrites those entries here, so that the node keeps its name
inside the container and points at the new device.

    TAR    ::= { HEADER[512] DATA[size rounded up to 512] } ZERO[512] ZERO[512] ...
    HEADER ::= name[100] mode[8] uid[8] gid[8] size[12] mtime[12] chksum[8] typeflag[1]
               linkname[100] magic[6] version[2] uname[32] gname[32] devmajor[8]
               devminor[8] prefix[155] pad[12]

Only the devmajor/devminor fields and the checksum of the matching headers change;
every other byte of the archive is kept (GNU sparse, long names and xattr records pass
through untouched). Pure: bytes in, bytes out.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass

BLOCK = 512
_CHR, _BLK = b"3", b"4"
_LONGNAME = b"L"        # GNU: the data of this record is the next header's full name
_PAX = b"x"             # POSIX: per-file extended header, may carry path=


@dataclass(frozen=True)
class NodeChange:
    """Renumber the node at `path` (relative to the tmpfs root, 'nvidia0' for
    /dev/nvidia0) from `old` to `new` (major, minor). A node whose number is not `old`
    is left alone."""
    path: str
    old: tuple[int, int]
    new: tuple[int, int]


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:                 # GNU base-256
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _put_octal(header: bytearray, offset: int, width: int, value: int) -> None:
    digits = b"%0*o" % (width - 1, value)
    if len(digits) > width - 1:
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    header[offset:offset + width] = digits + b"\0"


def _checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    total = sum(header)
    header[148:156] = b"%06o\0 " % total


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def _pax_path(data: bytes) -> str | None:
    """path= from a PAX extended header ('<len> path=<value>\\n' records)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            return None
        try:
            length = int(data[pos:space])
        except ValueError:
            return None
        record = data[space + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def remap_tar(data: bytes, changes: list[NodeChange]) -> tuple[bytes, list[str]]:
    """Apply changes to a plain (uncompressed) tar. Returns (new tar, paths changed)."""
    wanted = {_norm(c.path): c for c in changes}
    buf = bytearray(data)
    changed: list[str] = []
    pos = 0
    long_name: str | None = None
    while pos + BLOCK <= len(buf):
        header = buf[pos:pos + BLOCK]
        if header == bytes(BLOCK):
            break
        size = _number(bytes(header[124:136]))
        kind = bytes(header[156:157])
        data_start = pos + BLOCK
        next_pos = data_start + (size + BLOCK - 1) // BLOCK * BLOCK
        if next_pos > len(buf):
            raise ValueError("truncated tar archive")
        if kind == _LONGNAME:
            long_name = bytes(buf[data_start:data_start + size]).split(b"\0", 1)[0].decode(
                "utf-8", "surrogateescape")
            pos = next_pos
            continue
        if kind == _PAX:
            long_name = _pax_path(bytes(buf[data_start:data_start + size])) or long_name
            pos = next_pos
            continue
        name = long_name
        long_name = None
        if name is None:
            name = bytes(header[0:100]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if bytes(header[257:263]) == b"ustar\0" and header[345]:    # POSIX prefix
                prefix = bytes(header[345:500]).split(b"\0", 1)[0].decode(
                    "utf-8", "surrogateescape")
                name = f"{prefix}/{name}"
        change = wanted.get(_norm(name))
        if change is not None and kind in (_CHR, _BLK):
            number = (_number(bytes(header[329:337])), _number(bytes(header[337:345])))
            if number == tuple(change.old):
                _put_octal(header, 329, 8, change.new[0])
                _put_octal(header, 337, 8, change.new[1])
                _checksum(header)
                buf[pos:pos + BLOCK] = header
                changed.append(_norm(name))
        pos = next_pos
    return bytes(buf), changed


def remap_gz(data: bytes, changes: list[NodeChange]) -> tuple[bytes, list[str]]:
    """The same over a gzipped tar (CRIU's tmpfs-dev-*.tar.gz.img). Unchanged input is
    returned as it was, byte for byte."""
    plain, changed = remap_tar(gzip.decompress(data), changes)
    if not changed:
        return data, []
    return gzip.compress(plain, compresslevel=6), changed
