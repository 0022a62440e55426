"""Seeds without CRIU (store/seed.py, Repository.add_seed, `gpusnap seed`): where a
safetensors file is cut, untrusted headers refused, the record kept by gc until removed,
a damaged record stopping gc, an encrypted store's record sealed."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys

import pytest

from conftest import REPO
from s3server import s3_env, s3_server  # noqa: F401
from gpusnap.errors import IntegrityError, UsageError
from gpusnap.model import FileEntry, Manifest, Target
from gpusnap.store import Repository, chunker, keyfile
from gpusnap.store import seed as cutting

PAGE = 4096


def _safetensors(path, sizes: list[int], seed: int = 3, pad: int = 0) -> list[bytes]:
    """A safetensors file of random tensors of these sizes (the header padded by pad
    bytes: tensors land off the page grid of the file); their bytes."""
    rnd = random.Random(seed)
    header, off, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for i, size in enumerate(sizes):
        header[f"t{i}"] = {"dtype": "BF16", "shape": [size // 2], "data_offsets": [off, off + size]}
        blobs.append(rnd.randbytes(size))
        off += size
    raw = json.dumps(header).encode() + b" " * pad
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return blobs


def _raw(path, header: bytes, tail: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(header + tail)
    return str(path)


@pytest.mark.parametrize("case", ["short", "huge", "notjson", "list", "outside", "negative",
                                  "strings", "nooffsets"])
def test_a_file_that_is_not_safetensors_is_refused_before_anything(tmp_path, case):
    hdr = lambda obj: (lambda raw: struct.pack("<Q", len(raw)) + raw)(json.dumps(obj).encode())  # noqa: E731
    data = {"short": b"abc",
            "huge": struct.pack("<Q", 1 << 40) + b"{}",
            "notjson": struct.pack("<Q", 4) + b"\xff\xfe{x",
            "list": hdr([1, 2]),
            "outside": hdr({"t": {"data_offsets": [0, 4096]}}) + b"x" * 10,
            "negative": hdr({"t": {"data_offsets": [-8, 4]}}) + b"x" * 10,
            "strings": hdr({"t": {"data_offsets": ["0", "4"]}}) + b"x" * 10,
            "nooffsets": hdr({"t": {"dtype": "BF16"}})}[case]
    path = _raw(tmp_path / "w.safetensors", data)
    with pytest.raises(UsageError) as exc:
        cutting.spans(path)
    assert exc.value.exit_code == 2 and "not a safetensors file" in exc.value.message


def test_each_tensor_is_cut_from_its_start_as_a_run_of_pages(tmp_path):
    sizes = [PAGE * 300 + 100, 500, PAGE * 2, PAGE * 1100]
    path = str(tmp_path / "w.safetensors")
    blobs = _safetensors(path, sizes, pad=123)          # tensors off the file's page grid
    got = cutting.spans(path)
    ranges = cutting.tensor_ranges(path)
    assert [e - s for s, e in ranges] == sizes
    want = []
    for (start, _end), blob in zip(ranges, blobs):
        whole = len(blob) // PAGE * PAGE
        if whole:                       # as the page stream cuts the tensor in memory
            want += [(start + off, n) for off, n in chunker.run_spans(memoryview(blob[:whole]))]
    assert got == want
    assert sum(n for _o, n in got) == sum(n // PAGE * PAGE for n in sizes)
    assert all(n % PAGE == 0 for _o, n in got)


def _store_with_seed(tmp_path, key_file=None):
    repo = Repository.open(str(tmp_path / "store"), key_file=key_file)
    path = str(tmp_path / "w.safetensors")
    blobs = _safetensors(path, [PAGE * 700, PAGE * 90 + 7])
    with repo.shared_lock():
        record, tally = repo.add_seed([path], name="m")
    return repo, path, blobs, record, tally


def test_a_seed_is_kept_by_gc_until_it_is_removed(tmp_path):
    repo, _path, _blobs, record, tally = _store_with_seed(tmp_path)
    assert tally.new > 0 and record.bytes_seeded == PAGE * 790
    assert [s.id for s in repo.seeds()[0]] == [record.id] and repo.seeds()[1] == {}
    assert not repo.missing_chunks(record.chunk_sizes())
    with repo.exclusive_lock():
        assert repo.gc_plan()["chunks"] == []
        assert repo.remove_seeds([record.id]) == [record.id]
        plan = repo.gc_plan()
        assert len(plan["chunks"]) == len(record.chunk_sizes())
        repo.gc_execute(plan)
    assert set(repo.missing_chunks(record.chunk_sizes())) == set(record.chunk_sizes())


def test_chunks_a_snapshot_shares_with_a_removed_seed_stay(tmp_path):
    repo, path, _blobs, record, _tally = _store_with_seed(tmp_path)
    # a snapshot whose image holds the first chunks of the seed (as a dump of a server
    # holding those tensors would store them)
    spans = cutting.spans(path)[:2]
    with repo.shared_lock():
        chunks, tally = repo.ingest_spans([path], [spans])
        assert tally.new == 0
        entry = FileEntry("pages-1.img", sum(n for _c, n in chunks[0]), 0o600, chunks[0])
        snap = Manifest(target=Target(kind="process", root_pid=1, pids=[1]), pids=[1], files=[entry])
        repo.commit(snap)
    shared = set(snap.chunk_sizes())
    assert shared and shared < set(record.chunk_sizes())
    with repo.exclusive_lock():
        repo.remove_seeds([record.id])
        plan = repo.gc_plan()
        repo.gc_execute(plan)
    assert not repo.missing_chunks(shared)
    assert len(plan["chunks"]) == len(record.chunk_sizes()) - len(shared)


def test_a_damaged_seed_record_stops_gc_and_is_listed(tmp_path):
    repo, _path, _blobs, record, _tally = _store_with_seed(tmp_path)
    with open(os.path.join(repo.path, "seeds", f"{record.id}.json"), "w") as f:
        f.write('{"format": 1, "id": "' + record.id + '", "files": [{"path": "w", "size": 5}]}')
    with repo.exclusive_lock(), pytest.raises(IntegrityError) as exc:
        repo.gc_plan()
    assert "seed" in exc.value.message and "gpusnap seed rm" in exc.value.hint
    good, bad = repo.seeds()
    assert good == [] and list(bad) == [record.id]


def test_unknown_seed_ids_are_refused(tmp_path):
    repo, *_ = _store_with_seed(tmp_path)
    for bad in ("0123456789abcdef", "../x", "x" * 16):
        with pytest.raises(UsageError):
            repo.remove_seeds([bad])


def test_an_encrypted_stores_seed_record_is_sealed(tmp_path):
    key = str(tmp_path / "key")
    keyfile.generate(key)
    repo, _path, _blobs, record, _tally = _store_with_seed(tmp_path, key_file=key)
    with open(os.path.join(repo.path, "seeds", f"{record.id}.json"), "rb") as f:
        raw = f.read()
    assert b"w.safetensors" not in raw and b"chunks" not in raw
    assert repo.load_seed(record.id).chunk_sizes() == record.chunk_sizes()
    # the record's additional data names its kind: renamed to a manifest, it does not open
    with open(os.path.join(repo.path, "snapshots", f"{record.id}.json"), "wb") as f:
        f.write(raw)
    with pytest.raises(IntegrityError):
        repo.load(record.id)


def test_the_cli_adds_lists_and_removes_seeds(tmp_path):
    path = str(tmp_path / "w.safetensors")
    _safetensors(path, [PAGE * 64])
    env = {**os.environ, "GPUSNAP_STORE": str(tmp_path / "store")}

    def cli(*args):
        res = subprocess.run([sys.executable, "-m", "gpusnap", "--json", *args], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120)
        return res.returncode, json.loads(res.stdout) if res.stdout.strip() else None, res.stderr

    rc, out, err = cli("seed", "add", path, "--name", "m")
    assert rc == 0, err
    assert out["bytes_seeded"] == PAGE * 64 and out["bytes_new"] > 0 and out["files"] == [path]
    rc, again, _ = cli("seed", "add", path)
    assert rc == 0 and again["bytes_new"] == 0
    rc, listed, _ = cli("seed", "ls")
    assert rc == 0 and {s["id"] for s in listed["seeds"]} == {out["id"], again["id"]}
    rc, removed, _ = cli("seed", "rm", out["id"])
    assert rc == 0 and removed["removed"] == [out["id"]]
    shards = tmp_path / "model"
    shards.mkdir()
    for i in range(2):
        _safetensors(str(shards / f"model-0000{i + 1}-of-00002.safetensors"), [PAGE * 8], seed=i)
    rc, both, err = cli("seed", "add", str(shards))     # a directory: its shards
    assert rc == 0, err
    assert both["files"] == sorted(str(p) for p in shards.iterdir()) and both["bytes_seeded"] == PAGE * 16
    rc, failed, _ = cli("seed", "add", str(tmp_path / "store"))     # no .safetensors under it
    assert rc == 2 and "no .safetensors" in failed["message"]
    rc, failed, _ = cli("seed", "add", str(tmp_path / "missing.safetensors"))
    assert rc == 2
    rc, failed, _ = cli("seed", "rm", out["id"])
    assert rc == 2 and "no seed" in failed["message"]


def test_seeds_in_an_s3_store(s3_env, tmp_path):
    url = f"s3://{s3_env}/seeded"
    repo = Repository.open(url, cache=str(tmp_path / "cache"))
    path = str(tmp_path / "w.safetensors")
    _safetensors(path, [PAGE * 300])
    with repo.shared_lock():
        record, tally = repo.add_seed([path])
    assert tally.new > 0
    other = Repository.open(url, cache=str(tmp_path / "cache2"), create=False)   # another node
    assert [s.id for s in other.seeds()[0]] == [record.id]
    with other.exclusive_lock():
        assert other.gc_plan()["chunks"] == []
        other.remove_seeds([record.id])
        with pytest.raises(UsageError):
            other.remove_seeds([record.id])
        assert len(other.gc_plan()["chunks"]) == len(record.chunk_sizes())


def test_what_a_seed_holds_is_known_from_the_header(tmp_path):
    repo, path, _blobs, record, _tally = _store_with_seed(tmp_path)
    assert cutting.seeded_bytes(path) == record.bytes_seeded == record.files[0].size


def test_a_seed_of_the_same_files_unchanged_is_found_again(tmp_path):
    path = str(tmp_path / "w.safetensors")
    _safetensors(path, [PAGE * 700, PAGE * 90 + 7])
    old = os.stat(path).st_mtime - 3600
    os.utime(path, (old, old))              # the model landed before its seed
    repo = Repository.open(str(tmp_path / "store"))
    with repo.shared_lock():
        record, _tally = repo.add_seed([path])
    seeds = repo.seeds()[0]
    assert cutting.already_seeded(seeds, [path]).id == record.id
    assert cutting.already_seeded(seeds, [os.path.relpath(path)]).id == record.id
    other = str(tmp_path / "x.safetensors")
    _safetensors(other, [PAGE * 3])
    assert cutting.already_seeded(seeds, [path, other]) is None     # not the same files
    _safetensors(path, [PAGE * 700, PAGE * 91])                      # another layout
    os.utime(path, (old, old))
    assert cutting.already_seeded(seeds, [path]) is None
    _safetensors(path, [PAGE * 700, PAGE * 90 + 7], seed=9)          # same layout, rewritten
    assert cutting.already_seeded(seeds, [path]) is None


def test_weight_files_takes_a_models_directory_and_refuses_what_holds_no_weights(tmp_path):
    (tmp_path / "m" / "sub").mkdir(parents=True)
    for name in ("m/b.safetensors", "m/sub/a.safetensors", "m/config.json"):
        (tmp_path / name).write_bytes(b"x")
    lone = str(tmp_path / "lone.safetensors")
    (tmp_path / "lone.safetensors").write_bytes(b"x")
    assert cutting.weight_files([str(tmp_path / "m"), lone]) == \
        [str(tmp_path / "m" / "b.safetensors"), str(tmp_path / "m" / "sub" / "a.safetensors"), lone]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as exc:
        cutting.weight_files([str(tmp_path / "empty")])
    assert exc.value.exit_code == 2 and "holds no .safetensors file" in exc.value.message
    os.mkfifo(tmp_path / "pipe.safetensors")
    for name in ("pipe.safetensors", "missing.safetensors"):
        with pytest.raises(UsageError, match="is not a regular file"):
            cutting.weight_files([str(tmp_path / name)])
