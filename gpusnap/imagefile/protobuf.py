"""The few protobuf wire-format pieces CRIU images need (varint and fixed fields only).

Decoding by hand keeps gpusnap free of generated code for CRIU's .proto files; only
scalar fields of a handful of messages are read.
"""

from __future__ import annotations


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    if pos < len(buf) and buf[pos] < 0x80:      # one byte: keys and small values
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def encode_varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode_fields(msg: bytes) -> dict[int, int | bytes]:
    """field number -> last value; varint and fixed64/32 as int, length-delimited as bytes."""
    fields: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(msg):
        key, pos = read_varint(msg, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], pos = read_varint(msg, pos)
        elif wire == 1:
            fields[number] = int.from_bytes(msg[pos:pos + 8], "little")
            pos += 8
        elif wire == 5:
            fields[number] = int.from_bytes(msg[pos:pos + 4], "little")
            pos += 4
        elif wire == 2:
            length, pos = read_varint(msg, pos)
            fields[number] = msg[pos:pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(msg):
            raise ValueError("truncated field")
    return fields


def encode_varint_field(number: int, value: int) -> bytes:
    return encode_varint(number << 3) + encode_varint(value)
