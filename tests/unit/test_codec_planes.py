"""store/codec.py's bf16 byte planes (`dump --compress bf16`): same ids, fewer bytes for
bf16 weights, every read path back to the same bytes, and a reader that does not know the
transform fails instead of reading planes as data. The planes are split and joined with
numpy where it is installed, else with bytes' slicing: the round trips run both ways, and
chunks written by one (or by the level-1 encoding of before) read back with the other."""

from __future__ import annotations

import os
import random
import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from gpusnap.errors import IntegrityError
from gpusnap.store import Repository, codec

MIB = 1 << 20


def bf16_weights(n_bytes: int, seed: int = 0) -> bytes:
    """Little-endian bf16 of N(0, 0.02): the top half of each float32."""
    rng = random.Random(seed)
    floats = struct.pack(f"<{n_bytes // 2}f", *(rng.gauss(0, 0.02) for _ in range(n_bytes // 2)))
    return b"".join(floats[i + 2:i + 4] for i in range(0, len(floats), 4))


@pytest.fixture(scope="module")
def weights():
    return bf16_weights(MIB)


@pytest.fixture(params=["numpy", "bytes"], autouse=True)
def splitter(request, monkeypatch):
    """Each test with numpy splitting and joining the planes, then without it."""
    if request.param == "numpy":
        pytest.importorskip("numpy")
        monkeypatch.setattr(codec, "_NUMPY", [])        # looked up again
    else:
        monkeypatch.setattr(codec, "_NUMPY", [None])
    return request.param


def _other_splitter(monkeypatch, splitter):
    """Switch to the other way of splitting and joining (numpy <-> bytes)."""
    if splitter == "numpy":
        monkeypatch.setattr(codec, "_NUMPY", [None])
    else:
        numpy = pytest.importorskip("numpy")
        monkeypatch.setattr(codec, "_NUMPY", [numpy])


def test_planes_written_one_way_read_back_the_other(weights, monkeypatch, splitter):
    blob = codec.compress(weights, codec.BF16)
    cid = codec.chunk_id(weights)
    _other_splitter(monkeypatch, splitter)
    assert codec.compress(weights, codec.BF16) == blob         # the same frame either way
    assert codec.PLAIN.decode(blob, cid, len(weights)) == weights
    assert bytes(codec.PLAIN.decode_view(blob, cid, len(weights), check="frame")) == weights


def test_planes_of_the_level_1_encoding_of_before_still_read_back(weights):
    """Chunks `--compress bf16` wrote before codec.PLANES_PARAMS (level 1 over the planes):
    the same format, read by the same path; the new frames are no larger."""
    old = codec.PLANES_HEAD + zstandard.ZstdCompressor(level=1, write_checksum=True).compress(
        weights[0::2] + weights[1::2])
    cid = codec.chunk_id(weights)
    assert codec.PLAIN.decode(old, cid, len(weights)) == weights
    dest = memoryview(bytearray(len(weights)))
    codec.PLAIN.decode_view(old, cid, len(weights), dest, check="frame")
    assert bytes(dest) == weights
    assert len(codec.compress(weights, codec.BF16)) <= len(old) * 1.01


def test_bf16_weights_store_smaller_than_level_1(weights):
    planes = codec.compress(weights, codec.BF16)
    level1 = codec.compress(weights, 1)
    assert planes.startswith(codec.PLANES_HEAD)
    assert len(planes) < 0.75 * len(weights) and len(planes) < 0.92 * len(level1)


@pytest.mark.parametrize("check", ["frame", "id"])
def test_every_read_path_gives_the_bytes_back(weights, check):
    cid = codec.chunk_id(weights)
    blob = codec.compress(weights, codec.BF16)
    assert codec.PLAIN.decode(blob, cid, len(weights)) == weights
    assert bytes(codec.PLAIN.decode_view(blob, cid, len(weights), check=check)) == weights
    dest = memoryview(bytearray(len(weights) + 4096))[4096:]       # e.g. a mapping's view
    codec.PLAIN.decode_view(blob, cid, len(weights), dest, check=check)
    assert bytes(dest) == weights
    assert codec.has_frame_checksum(blob)


def test_encrypted_store_takes_planes_too(weights):
    pytest.importorskip("cryptography")
    enc = codec.EncryptedCodec(os.urandom(codec.KEY_SIZE))
    cid = enc.chunk_id(weights)
    blob = bytes(enc.encode(cid, weights, codec.BF16))
    assert enc.decode(blob, cid, len(weights)) == weights
    assert bytes(enc.decode_view(blob, cid, len(weights), check="frame")) == weights


def test_an_odd_sized_chunk_is_a_plain_frame():
    data = bf16_weights(4096) + b"x"
    blob = codec.compress(data, codec.BF16)
    assert not blob.startswith(codec.PLANES_HEAD)
    assert codec.PLAIN.decode(blob, codec.chunk_id(data), len(data)) == data


def test_a_reader_that_does_not_know_planes_never_gets_them_as_data(weights):
    blob = codec.compress(weights, codec.BF16)
    try:
        got = zstandard.ZstdDecompressor().decompress(blob, max_output_size=len(weights))
    except zstandard.ZstdError:
        return
    assert got != weights and len(got) != len(weights)


def test_a_corrupt_planes_chunk_is_refused(weights):
    blob = bytearray(codec.compress(weights, codec.BF16))
    blob[len(blob) // 2] ^= 0x40
    cid = codec.chunk_id(weights)
    with pytest.raises(IntegrityError):
        codec.PLAIN.decode(bytes(blob), cid, len(weights))
    with pytest.raises(IntegrityError):
        codec.PLAIN.decode_view(bytes(blob), cid, len(weights), check="frame")


def test_a_planes_chunk_of_odd_size_is_refused():
    """compress() never writes one; a forged chunk is an IntegrityError, not a crash."""
    data = b"abc"
    blob = codec.PLANES_HEAD + zstandard.ZstdCompressor(write_checksum=True).compress(data)
    cid = codec.chunk_id(data)
    with pytest.raises(IntegrityError, match="odd size"):
        codec.PLAIN.decode(blob, cid, len(data))
    with pytest.raises(IntegrityError, match="odd size"):
        codec.PLAIN.decode_view(blob, cid, len(data), check="frame")


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=9000))
def test_planes_round_trip_any_bytes(data):
    blob = codec.compress(data, codec.BF16)
    cid = codec.chunk_id(data)
    assert codec.PLAIN.decode(blob, cid, len(data)) == data
    assert bytes(codec.PLAIN.decode_view(blob, cid, len(data), check="frame")) == data


def test_a_store_keeps_ids_and_reads_planes_chunks_back(tmp_path, weights):
    ids = {}
    for level in (codec.FAST, codec.BF16):
        repo = Repository.open(str(tmp_path / f"s{level}"))
        repo.compress_level = level
        src = tmp_path / f"img{level}"
        src.mkdir()
        (src / "pages-1.img").write_bytes(weights)
        files, counts = repo.ingest_dir(str(src))
        ids[level] = [c for c, _ in files[0].chunks]
        for cid, n in files[0].chunks:
            assert repo.read_chunk(cid, n) == weights[:n] or cid == codec.ZERO_ID
        if level == codec.BF16:
            assert counts["bytes_stored"] < 0.75 * len(weights)
            assert repo.verify()["bad"] == []
    assert ids[codec.FAST] == ids[codec.BF16]


def test_numpy_comes_in_with_one_blas_thread_and_the_environment_as_it_was():
    """A page-stream worker imports numpy at its first bf16 chunk: no BLAS thread pool (one
    a CPU in each of 32 workers), and OPENBLAS_NUM_THREADS as it was, for what it starts."""
    pytest.importorskip("numpy")
    import subprocess
    import sys
    code = ("import os; from gpusnap.store import codec; assert codec._numpy() is not None; "
            "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1", "None"]
