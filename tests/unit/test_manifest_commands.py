"""A manifest that parses but is malformed, through every command that reads manifests:
ls skips it with a note, inspect/restore/export refuse it (exit 42), verify reports it
(exit 42), gc refuses to run (exit 42, nothing deleted), import refuses an archive
holding one (exit 45)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from gpusnap.cli import main
from gpusnap.store import Repository

from conftest import commit_snapshot, write_images
from test_model import MALFORMED

BAD_ID = "00d6bb30c927f1fd"     # the id in tests/unit/data/manifest-v1-process.json
CASES = ["empty object", "a list", "size a string", "pid a string", "negative size",
         "chunks not adding up", "absolute path", "path with ..", "nested path", "duplicate path",
         "id not hex", "chunk id not hex", "target kind unknown", "format 2"]


def _run(capsys, store: str, *args) -> tuple[int, list, str]:
    """(exit code, the JSON documents on stdout, stderr)."""
    try:
        main(["--store", store, "--json", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    docs, text = [], out.strip()
    while text:
        doc, end = json.JSONDecoder().raw_decode(text)
        docs.append(doc)
        text = text[end:].strip()
    return code, docs, err


@pytest.fixture(params=CASES)
def store(request, tmp_path):
    """A store holding one good snapshot, one dead chunk, and one malformed manifest."""
    repo = Repository.open(str(tmp_path / "store"))
    good = commit_snapshot(repo, write_images(str(tmp_path / "img"), {"core-1.img": b"good" * 99}))
    dead = commit_snapshot(repo, write_images(str(tmp_path / "img2"), {"core-2.img": b"dead" * 99}))
    repo.remove([dead.id])
    with open(os.path.join(repo.snapshots_dir, BAD_ID + ".json"), "w") as f:
        json.dump(MALFORMED[request.param][0], f)
    return repo, good.id


def test_ls_lists_the_others_and_names_it(store, capsys):
    repo, good = store
    code, docs, err = _run(capsys, repo.path, "ls")
    assert code == 0 and [s["id"] for s in docs[0]] == [good]
    assert f"manifest of snapshot {BAD_ID} is" in err


@pytest.mark.parametrize("command", ["inspect", "restore", "export"])
def test_commands_on_it_refuse_it(store, capsys, command, tmp_path):
    repo, _ = store
    args = [command, BAD_ID] + ([str(tmp_path / "x.tar")] if command == "export" else [])
    code, docs, err = _run(capsys, repo.path, *args)
    assert code == 42, err
    assert docs[-1]["error"] in ("ManifestInvalid", "IntegrityError")
    assert f"manifest of snapshot {BAD_ID} is" in docs[-1]["message"]
    assert "Traceback" not in err


def test_verify_reports_it(store, capsys):
    repo, good = store
    code, docs, _ = _run(capsys, repo.path, "verify")
    assert code == 42
    assert [b["snapshot"] for b in docs[0]["bad"]] == [BAD_ID]
    assert _run(capsys, repo.path, "verify", good)[0] == 0, "the others still verify"


@pytest.mark.parametrize("dry_run", [True, False])
def test_gc_refuses_to_run(store, capsys, dry_run):
    repo, good = store
    chunks = sorted(os.listdir(repo.chunks_dir))
    code, docs, err = _run(capsys, repo.path, "gc", *(["--dry-run"] if dry_run else []))
    assert code == 42 and BAD_ID in docs[-1]["message"]
    assert "gc deletes nothing" in err
    assert sorted(os.listdir(repo.chunks_dir)) == chunks, "not even the dead chunk"
    os.unlink(os.path.join(repo.snapshots_dir, BAD_ID + ".json"))
    code, docs, _ = _run(capsys, repo.path, "gc")
    assert code == 0 and docs[0]["chunks"] == 1, "once it is gone gc runs"
    assert _run(capsys, repo.path, "verify", good)[0] == 0


def _archive(manifest) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, doc in (("gpusnap-archive.json",
                           {"format": "gpusnap-archive", "version": 1, "snapshot": BAD_ID,
                            "hash": "sha256", "codec": "zstd", "chunks": {}, "bytes": 0}),
                          ("manifest.json", manifest)):
            data = json.dumps(doc).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("case", CASES)
def test_import_refuses_it(case, tmp_path, capsys):
    path = tmp_path / "bad.tar"
    path.write_bytes(_archive(MALFORMED[case][0]))
    store = str(tmp_path / "store")
    code, docs, err = _run(capsys, store, "import", str(path))
    assert code == 45 and "manifest is invalid" in docs[-1]["message"], err
    assert Repository.open(store).snapshot_ids() == []
