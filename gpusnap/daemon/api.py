"""What each request does. run_* functions run in an operation's forked child
(daemon/ops.py) and call the same engine façade as the CLI; the read-only queries
(snapshots, inspect) run in the daemon itself: they only read manifests.
"""

from __future__ import annotations

import dataclasses
import os
import time

from ..errors import UsageError
from .client import FORWARDED, command_of  # noqa: F401  (the server reads them here)

# CLI commands the daemon runs for a client (the rest run in the client: daemon, demo,
# bench, hooks, doctor, key, export, import, which touch the caller's own files or tty).
READ_ONLY = {"ls", "inspect"}


@dataclasses.dataclass
class Store:
    path: str
    key_file: str | None = None

    def repo(self, create: bool = False):
        from ..store import Repository
        return Repository.open(self.path, create=create, key_file=self.key_file)


def _request(cls, body: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(body) - names
    if unknown:
        raise UsageError(f"unknown fields {sorted(unknown)}; known: {sorted(names)}")
    return cls(**body)


def run_cli(argv: list[str], cwd: str) -> dict:
    """A gpusnap command line, as the CLI runs it; its exit code and what it emitted."""
    from ..cli import context, main
    context.VIA = "daemon"
    emitted: list = []
    context.EMIT_SINK = emitted.append
    os.chdir(cwd)
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return {"exit_code": code, "emitted": emitted}


def run_dump(body: dict, store: Store) -> dict:
    from ..engine import dump
    started = time.perf_counter()
    req = _request(dump.DumpRequest, body)
    req.seed = tuple(str(p) for p in req.seed or ())
    if not all(os.path.isabs(p) or p == dump.SEED_AUTO for p in req.seed):
        raise UsageError("seed: give absolute paths (the daemon does not run where you do), "
                         "or \"auto\"")
    plan = dump.plan(req)
    planned = time.perf_counter() - started
    report: dict = {}
    out = dump.execute(plan, store.repo(create=True), None, report).to_json()
    keys = ("id", "name", "bytes_logical", "bytes_stored", "bytes_new", "downtime", "sdk", "notes")
    return {**{k: out.get(k) for k in keys}, "timings": {"plan": round(planned, 4), **out["timings"]},
            "seed": report.get("seed"), "via": "daemon"}


def run_restore(body: dict, store: Store) -> dict:
    from ..engine import restore
    started = time.perf_counter()
    repo = store.repo()
    plan = restore.plan(_request(restore.RestoreRequest, body), repo)
    planned = time.perf_counter() - started
    result = restore.execute(plan, repo, None)
    result["timings"] = {"plan": round(planned, 4), **result["timings"]}
    return {**result, "via": "daemon"}


def run_warm(body: dict, store: Store) -> dict:
    """Prefetch: keep the snapshots' images prepared (verified) for fast restores, for
    the page path body["pages"] (auto: as a restore here would choose)."""
    from ..engine import imagecache, pagepath
    repo = store.repo()
    out = []
    for ref in body.get("snapshots") or []:
        m = repo.load_ref(str(ref))
        kind, _notes = pagepath.choose(str(body.get("pages") or "auto"), m.target.kind)
        out.append({"id": m.id, "path": imagecache.warm(repo, m, None, kind), "bytes": m.bytes_logical,
                    "pages": kind})
    if not out:
        raise UsageError("name at least one snapshot")
    return {"warmed": out, "via": "daemon"}


def snapshots(store: Store) -> list[dict]:
    from ..store import Repository
    if not Repository.exists(store.path):
        return []
    return [s.__dict__ for s in store.repo().list()]


def inspect(store: Store, ref: str) -> dict:
    repo = store.repo()
    data = repo.load_ref(ref).to_json()
    return {**{k: v for k, v in data.items() if k not in ("files", "logs")}, "files": len(data["files"])}


def use_host_gpus(gpus: list[dict]) -> None:
    """In a restore's child: plan with the GPU facts the daemon's helper gave."""
    from ..engine import gpu
    gpu.use_host_gpus(gpus)


def warm_imports(store: str = "") -> None:
    """Import what operations need, once, in the daemon: every child starts with them
    (for an s3:// store, its client library with the S3 model loaded too)."""
    import importlib
    for name in ("gpusnap.engine.dump", "gpusnap.engine.restore", "gpusnap.engine.strategies",
                 "gpusnap.engine.pagepath", "gpusnap.engine.imagecache", "gpusnap.engine.park",
                 "gpusnap.store", "gpusnap.targets.process",
                 "gpusnap.cuda.discover", "gpusnap.cuda.session", "gpusnap.criu.runner", "tqdm",
                 *(f"gpusnap.cli.cmd_{c}" for c in sorted(FORWARDED))):
        importlib.import_module(name)
    for optional in ("gpusnap.targets.containers", "pynvml"):
        try:
            importlib.import_module(optional)
        except Exception:  # noqa: BLE001 - a host without docker's SDK or NVML
            pass
    _preload_libcuda()
    from ..criu.locate import find_criu
    try:
        find_criu()                             # cached: children skip `criu --version`
    except Exception:  # noqa: BLE001 - each operation reports a missing CRIU itself
        pass
    if store.startswith("s3://"):
        _warm_s3(store)


def _warm_s3(url: str) -> None:
    """botocore imported, and a client made (no request sent) from the session that each
    operation's child then makes its own from (backends/s3.py: _new_client), ~10 ms
    instead of the import and a first client, ~0.2-0.3 s of every restore's plan. A
    store the daemon cannot reach yet is each operation's to report."""
    try:
        from ..store.backends.s3 import S3Backend
        S3Backend(url).client()
    except Exception:  # noqa: BLE001 - no botocore, no credentials: the operation says so
        pass


def _preload_libcuda() -> None:
    """dlopen libcuda (no cuInit: CUDA cannot be used in a child forked after cuInit, so
    each operation's child initialises it, overlapped with CRIU restore as the CLI does)."""
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pass
