"""Property-based tests of every parser gpusnap feeds untrusted bytes: CRIU images
(protobuf varints and fields, the image container, pagemap, mm), archives, and the SDK
protocol in both directions. Each property tries BUDGET inputs (a fixed budget, so CI
stays fast); any exception but the parser's own refusal is a bug."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import tarfile
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gpusnap.errors import GpusnapError
from gpusnap.imagefile import image, mm, pagemap, protobuf
from gpusnap.sdk import protocol, registry
from gpusnap.sdk.agent import Agent
from gpusnap.store import Repository, archive

from conftest import commit_snapshot

BUDGET = 200
fuzz = settings(max_examples=BUDGET, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_HEADER = struct.pack("<II", image.IMG_COMMON_MAGIC, image.PAGEMAP_MAGIC)
_MM_HEADER = struct.pack("<II", image.IMG_COMMON_MAGIC, mm.MM_MAGIC)


# ---- CRIU images ---------------------------------------------------------------------------

@fuzz
@given(st.integers(0, 2**64 - 1), st.binary(max_size=8))
def test_varints_round_trip(value, tail):
    enc = protobuf.encode_varint(value)
    assert protobuf.read_varint(enc + tail, 0) == (value, len(enc))


@fuzz
@given(st.binary(max_size=512))
def test_protobuf_fields_refuse_garbage_with_value_error(data):
    try:
        fields = protobuf.decode_fields(data)
    except ValueError:
        return
    assert all(isinstance(v, (int, bytes)) for v in fields.values())


def _image(header: bytes, payloads: list[bytes]) -> bytes:
    out = io.BytesIO()
    out.write(header)
    for p in payloads:
        image.write_entry(out, p)
    return out.getvalue()


_pagemap_entry = st.fixed_dictionaries(
    {1: st.integers(0, 2**48)}, optional={2: st.integers(0, 2**32 - 1), 3: st.integers(0, 1),
                                          4: st.integers(0, 7), 5: st.integers(0, 2**40)})


@fuzz
@given(st.integers(0, 2**32 - 1), st.lists(_pagemap_entry, max_size=20))
def test_pagemap_round_trips_through_raw_read_and_write(pages_id, entries):
    payloads = [b"".join(protobuf.encode_varint_field(k, v) for k, v in sorted(e.items()))
                for e in entries]
    blob = _image(_HEADER, [protobuf.encode_varint_field(1, pages_id), *payloads])
    got_id, parsed = pagemap.parse(io.BytesIO(blob))
    raw = pagemap.read_raw(io.BytesIO(blob))
    assert got_id == raw.pages_id == pages_id and parsed == raw.entries
    out = io.BytesIO()
    pagemap.write(out, raw, raw.payloads)
    assert out.getvalue() == blob


@fuzz
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: _HEADER + b),
                 st.binary(max_size=300).map(lambda b: _MM_HEADER + b)))
def test_image_parsers_refuse_garbage_with_value_error(data):
    for parse in (pagemap.parse, pagemap.read_raw, mm.parse):
        try:
            parse(io.BytesIO(data))
        except ValueError:
            pass


@fuzz
@given(st.lists(st.tuples(st.integers(0, 2**47), st.integers(0, 2**20), st.integers(0, 2**16),
                          st.integers(0, 0x7F)), max_size=12))
def test_mm_vmas_round_trip_and_ranges_are_sorted_and_disjoint(vmas):
    body = b"".join(
        protobuf.encode_varint(14 << 3 | 2) + protobuf.encode_varint(len(v)) + v
        for v in (protobuf.encode_varint_field(1, s) + protobuf.encode_varint_field(2, s + n * 4096)
                  + protobuf.encode_varint_field(6, fl) + protobuf.encode_varint_field(7, stt)
                  for s, n, stt, fl in vmas))
    parsed = mm.parse(io.BytesIO(_image(_MM_HEADER, [protobuf.encode_varint_field(1, 7) + body])))
    assert [(v.start, v.end, v.status, v.flags) for v in parsed] == [
        (s, s + n * 4096, stt, fl) for s, n, stt, fl in vmas]
    ranges = mm.anon_private_ranges(parsed)
    assert all(a < b for a, b in ranges) and all(ranges[i][1] < ranges[i + 1][0] for i in range(len(ranges) - 1))


# ---- archives --------------------------------------------------------------------------------

def _archive() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        repo = Repository.open(os.path.join(d, "store"))
        os.mkdir(os.path.join(d, "img"))
        with open(os.path.join(d, "img", "pages-1.img"), "wb") as f:
            f.write(os.urandom(3000) + bytes(5000))
        sid = commit_snapshot(repo, os.path.join(d, "img")).id
        out = io.BytesIO()
        archive.export(repo, sid, out)
        return out.getvalue()


_VALID = _archive()


def _import(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        repo = Repository.open(os.path.join(d, "store"))
        try:
            archive.import_(repo, io.BytesIO(data))
        except GpusnapError:
            assert repo.snapshot_ids() == [], "a refused archive committed a snapshot"


@fuzz
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(_VALID)))
def test_a_damaged_archive_is_refused_or_imported_whole(flips, cut):
    data = bytearray(_VALID[:max(cut, 1)])
    for offset, value in flips:
        if offset < len(data):
            data[offset] = value
    _import(bytes(data))


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                     max_leaves=12)


@fuzz
@given(st.dictionaries(st.sampled_from(["format", "version", "snapshot", "hash", "codec", "bytes",
                                        "chunks", "encryption"]), _json),
       _json)
def test_forged_headers_and_manifests_are_refused(header, manifest):
    base = {"format": archive.FORMAT, "version": 1, "hash": "sha256", "codec": "zstd"}
    members = [(archive.HEADER_NAME, json.dumps({**base, **header}).encode()),
               (archive.MANIFEST_NAME, json.dumps(manifest).encode())]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _import(out.getvalue())


# ---- the SDK protocol ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_agent():
    """One agent for every example; closed after the module (its thread would stop later
    tests' forks)."""
    d = tempfile.mkdtemp(prefix="gpusnap-fuzz-")
    agent = Agent(registry.Registry(), socket_dir=os.path.join(d, "run")).start()
    yield agent
    agent.close()
    shutil.rmtree(d, ignore_errors=True)


@fuzz
@given(st.one_of(st.binary(max_size=2000),
                 _json.map(lambda v: json.dumps(v).encode() + b"\n"),
                 st.dictionaries(st.just("cmd"), st.text(max_size=10) | st.integers() | st.none())
                 .map(lambda v: json.dumps(v).encode())))
def test_the_agent_answers_any_request_with_a_json_object(fuzz_agent, message):
    if b"prepare" in message or b"resume" in message:
        return                          # real commands: tested with a model in test_sdk.py
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(fuzz_agent.path)
        s.sendall(message)
        s.shutdown(socket.SHUT_WR)
        reply = json.loads(protocol.recv_message(s, None))
    assert isinstance(reply, dict) and "ok" in reply and reply["state"] == "resident"


@fuzz
@given(st.binary(max_size=2000))
def test_the_client_refuses_any_bad_answer_with_agent_error(answer):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.sock")
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(1)

        def serve():
            c, _ = srv.accept()
            with c:
                protocol.recv_message(c, None)
                try:
                    c.sendall(answer)
                except OSError:
                    pass
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            reply = protocol.request(path, "status", timeout=5)
            assert isinstance(reply, dict) and reply.get("ok")
        except protocol.AgentError:
            pass
        finally:
            t.join(5)
            srv.close()


@fuzz
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 2**64 - 1)), max_size=12),
       st.binary(max_size=6), st.booleans())
def test_mm_fast_vma_reader_agrees_with_decode_fields(fields, tail, add_tail):
    """mm's one-loop vma_entry reader gives what decode_fields gives, on any message (one
    with a longer key or another wire type goes the slow way; bad bytes: ValueError)."""
    msg = b"".join(protobuf.encode_varint_field(n, v) for n, v in fields) + (tail if add_tail else b"")
    try:
        slow = mm._vma_fields_slow(msg)
    except ValueError:
        slow = ValueError
    try:
        fast = mm._vma_fields(msg)
    except ValueError:
        fast = ValueError
    assert fast == slow
