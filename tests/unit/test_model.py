"""The typed manifest: manifests written before it load and write back byte for byte; a
manifest that parses but is malformed is ManifestInvalid (exit 42) and nothing else,
whatever JSON it is (property tests)."""

from __future__ import annotations

import copy
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpusnap.errors import IntegrityError, ManifestInvalid
from gpusnap.model import FileEntry, Manifest, Target

DATA = os.path.join(os.path.dirname(__file__), "data")
ID64 = "ab" * 32


def stored_json(m: Manifest) -> str:
    """In the layout of the manifests in data/ (Repository.commit wrote indent=1 then;
    it writes compact JSON now, of the same to_json())."""
    return json.dumps(m.to_json(), indent=1, sort_keys=True)


def old_manifest() -> dict:
    """A manifest written by gpusnap before the typed model (a real CRIU dump, trimmed)."""
    with open(os.path.join(DATA, "manifest-v1-process.json")) as f:
        return json.load(f)


def gpu_manifest() -> dict:
    """The same with the CUDA and SDK facts a GPU dump records (session.describe(),
    agent_steps.DumpAgents.record())."""
    m = old_manifest()
    m["cuda"] = {"pids": [27567], "states": {"27567": "RUNNING"}, "driver_version": "580.95.05",
                 "cuda_driver_version": 13000, "used_memory": {"GPU-1": 1 << 30},
                 "gpus": [{"index": 0, "uuid": "GPU-1", "name": "NVIDIA H200", "memory_total": 150,
                           "memory_free": 100, "pci_bus_id": "0000:19:00.0", "minor": 0}]}
    m["sdk"] = {"bytes_out_of_image": 4096, "agents": [{
        "pid": 27567, "socket": "/run/gpusnap/agent-27567.sock", "uid": 0, "tensors": 3,
        "weight_files": [{"path": "/m/model.safetensors", "size": 4200, "mtime_ns": 17,
                          "header_sha256": "00" * 32, "content_hash": "sampled",
                          "content_sha256": "11" * 32}],
        "bytes_out_of_image": 4096, "gpu_bytes_released": 4096,
        "backend": {"reader": "pinned", "reason": "no kvikio"}}]}
    return m


# ---- what exists keeps working --------------------------------------------------------------

def test_an_old_manifest_loads_and_writes_back_byte_for_byte():
    with open(os.path.join(DATA, "manifest-v1-process.json")) as f:
        text = f.read()
    m = Manifest.from_json(json.loads(text))
    assert m.target.kind == "process" and m.criu.shell_job is False and m.cuda is None
    assert m.files[0].chunks[0][1] == m.files[0].size
    assert stored_json(m) == text


def test_gpu_and_sdk_facts_round_trip():
    data = gpu_manifest()
    m = Manifest.from_json(data)
    assert m.cuda.pids == [27567] and m.cuda.gpus[0]["uuid"] == "GPU-1"
    assert m.sdk.agents[0].weight_files[0].mtime_ns == 17
    assert m.to_json() == data


def test_unknown_keys_are_kept():
    data = dict(old_manifest(), added_later={"x": [1]})
    m = Manifest.from_json(data)
    assert m.extra == {"added_later": {"x": [1]}} and m.to_json() == data


def test_optional_fields_default_as_the_first_manifests_left_them_out():
    data = old_manifest()
    for key in ("name", "criu", "criu_version", "kernel", "host", "logs", "sdk", "notes",
                "timings", "cuda", "zero_pages_dropped", "leave_running", "gpusnap_version"):
        del data[key]
    m = Manifest.from_json(data)
    assert m.criu.shell_job is False and m.logs == [] and m.sdk is None and m.timings == {}


# ---- malformed ------------------------------------------------------------------------------

def _with(path: str, value):
    """The old manifest with the value at path ('a.b.0.c') replaced (DELETE: removed)."""
    data = old_manifest()
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return data


DELETE = object()
FIRST = old_manifest()["files"][0]


def _file(**kw) -> dict:
    return dict(FIRST, **kw)


MALFORMED = {
    "empty object": ({}, "format is missing"),
    "a list": ([], "must be an object"),
    "a string": ("manifest", "must be an object"),
    "null": (None, "must be an object"),
    "format 2": (_with("format", 2), "format 2 is not supported"),
    "format as a string": (_with("format", "1"), "format '1' is not supported"),
    "no id": (_with("id", DELETE), "id is missing"),
    "id not hex": (_with("id", "ZZ00aa11bb22cc33"), "lower-case hex"),
    "id too long": (_with("id", "a" * 65), "lower-case hex"),
    "no target": (_with("target", DELETE), "target is missing"),
    "target a list": (_with("target", []), "target must be an object"),
    "target kind unknown": (_with("target.kind", "vm"), "target.kind"),
    "root pid negative": (_with("target.root_pid", -1), "root_pid"),
    "pids not a list": (_with("pids", 5), "pids must be a list"),
    "pid a string": (_with("pids.0", "1"), "pids[0]"),
    "pid a bool": (_with("pids.0", True), "pids[0]"),
    "files missing": (_with("files", DELETE), "files is missing"),
    "files an object": (_with("files", {}), "files must be a list"),
    "file not an object": (_with("files.0", "core"), "files[0] must be an object"),
    "negative size": (_with("files.0", _file(size=-1, chunks=[])), "size must be an integer >= 0"),
    "size a string": (_with("files.0.size", "2872"), "size must be an integer"),
    "chunks not adding up": (_with("files.0.size", 100), "add up to 2872"),
    "chunk of length 0": (_with("files.0", _file(size=0, chunks=[[ID64, 0]])), "chunks[0][1]"),
    "chunk length negative": (_with("files.0", _file(chunks=[[ID64, 2873], [ID64, -1]])), "chunks[1][1]"),
    "chunk not a pair": (_with("files.0.chunks.0", [ID64]), "a pair"),
    "chunk id not hex": (_with("files.0.chunks.0.0", "x" * 64), "64 lower-case hex"),
    "chunk id upper case": (_with("files.0.chunks.0.0", "AB" * 32), "64 lower-case hex"),
    "chunk id short": (_with("files.0.chunks.0.0", "ab"), "64 lower-case hex"),
    "absolute path": (_with("files.0.path", "/etc/passwd"), "must be relative"),
    "path with ..": (_with("files.0.path", "../evil"), "must be relative"),
    "path with .. inside": (_with("files.0.path", "a/../../evil"), "must be relative"),
    "empty path": (_with("files.0.path", ""), "must be relative"),
    "path with an empty part": (_with("files.0.path", "a//b"), "must be relative"),
    "nested path": (_with("files.1", _file(path=FIRST["path"] + "/x")), "is under"),
    "duplicate path": (_with("files.1", _file()), "twice"),
    "mode too large": (_with("files.0.mode", 1 << 20), "mode"),
    "log path absolute": (_with("logs.0.path", "/tmp/x"), "logs[0].path"),
    "bytes negative": (_with("bytes_stored", -5), "bytes_stored"),
    "timings not numbers": (_with("timings", {"a": "b"}), "timings.a"),
    "notes not strings": (_with("notes", [1]), "notes[0]"),
    "criu shell_job not bool": (_with("criu.shell_job", "no"), "shell_job"),
    "cuda a list": (_with("cuda", []), "cuda must be an object"),
    "cuda gpu without uuid": (_with("cuda", {"pids": [1], "gpus": [{}]}), "uuid is missing"),
    "sdk agent relative socket": (_with("sdk", {"agents": [{"pid": 1, "socket": "a.sock"}]}), "absolute"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifests_are_refused_clearly(case):
    data, message = MALFORMED[case]
    with pytest.raises(ManifestInvalid, match=None) as info:
        Manifest.from_json(copy.deepcopy(data))
    assert message in info.value.message, info.value.message
    assert info.value.exit_code == 42 and isinstance(info.value, IntegrityError)


def test_a_manifest_built_in_code_is_checked_when_committed(tmp_path):
    from gpusnap.store import Repository
    repo = Repository.open(str(tmp_path / "s"))
    m = Manifest(target=Target("process", 1, [1]), pids=[1],
                 files=[FileEntry("a", 1, chunks=[("zero", 1)]), FileEntry("a/b", 0)])
    with pytest.raises(ManifestInvalid, match="is under"):
        repo.commit(m)
    assert repo.snapshot_ids() == []


# ---- any JSON at all ------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
KEYS = sorted(old_manifest())


def _parse_or_refuse(data):
    try:
        m = Manifest.from_json(data)
    except ManifestInvalid as exc:
        assert exc.message and exc.exit_code == 42
        return None
    assert Manifest.from_json(m.to_json()) == m, "what loads writes back as it was"
    return m


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_json_is_a_manifest_or_manifest_invalid(data):
    _parse_or_refuse(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_damage_to_a_good_manifest_is_caught_or_harmless(draw):
    """Replace one value anywhere in a real manifest by arbitrary JSON."""
    data = gpu_manifest()
    node, key = data, draw.draw(st.sampled_from(KEYS))
    while isinstance(node[key], (dict, list)) and node[key] and draw.draw(st.booleans()):
        node = node[key]
        key = draw.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
    node[key] = draw.draw(JSON)
    _parse_or_refuse(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(["a", "b", "..", ".", ""]), min_size=1, max_size=3),
                          st.integers(-2, 3)), max_size=4))
def test_file_lists_are_all_or_nothing(entries):
    """Paths from a small alphabet and odd sizes: a list loads only when every path stays
    inside, none is another's prefix directory, and chunks add up."""
    files = [{"path": "/".join(parts), "size": size, "mode": 0o600,
              "chunks": [["zero", size]] if size > 0 else []} for parts, size in entries]
    m = _parse_or_refuse(dict(old_manifest(), files=files))
    if m is not None:
        paths = [f.path for f in m.files]
        assert len(set(paths)) == len(paths)
        assert not any(p.startswith(q + "/") for p in paths for q in paths)
        assert all(".." not in p.split("/") and not p.startswith("/") for p in paths)
