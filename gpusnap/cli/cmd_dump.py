import contextlib
import os
import time

import click

from .complete import complete_containers
from .context import human_bytes, timings_table


def _valid_name(ctx, param, name):
    from ..store.repository import validate_name
    return None if name is None else validate_name(name)


class CompressLevel(click.ParamType):
    """A zstd level 1-19, fast (zstd's fast mode: matches, no entropy coding), bf16 (byte
    planes, store/codec.py) or none (zstd's fastest level: near raw, for incompressible
    data)."""
    name = "LEVEL|fast|bf16|none"

    def convert(self, value, param, ctx):
        from ..store.codec import BF16, FAST, NO_COMPRESSION
        if isinstance(value, int):
            return value
        if str(value).lower() == "none":
            return NO_COMPRESSION
        if str(value).lower() == "bf16":
            return BF16
        if str(value).lower() == "fast":
            return FAST
        if str(value).isdigit() and 1 <= int(value) <= 19:
            return int(value)
        self.fail(f"{value!r} is not a zstd level 1-19, fast, bf16 or none", param, ctx)


def _seed_paths(_ctx, _param, values):
    """--seed: `auto` as it is, else an existing path (./auto for a file named auto)."""
    for value in values:
        if value != "auto" and not os.path.exists(value):
            raise click.BadParameter(f"{value!r} does not exist", param_hint="--seed")
    return values


@click.command("dump")
@click.argument("containers", nargs=-1, shell_complete=complete_containers)
@click.option("--pid", type=int, help="Dump the process tree rooted at PID.")
@click.option("--engine", envvar="GPUSNAP_ENGINE", type=click.Choice(["docker", "podman"]),
              help="Container engine (default: whichever knows the name; env GPUSNAP_ENGINE).")
@click.option("--name", callback=_valid_name,
              help="A name for the snapshot: commands that take SNAP read it as the newest "
                   "snapshot of that name; dumps may reuse it. Several containers: NAME.CONTAINER.")
@click.option("--leave-running", is_flag=True,
              help="Keep the original running after the dump. It runs again once CRIU has read "
                   "its memory (and the driver has put its GPU memory back): a process tree's "
                   "pages wait in up to a quarter of the memory left to gpusnap while the store "
                   "writes them (`gpusnap doctor` says how much).")
@click.option("--lock-timeout", envvar="GPUSNAP_LOCK_TIMEOUT", type=float, default=10.0,
              show_default=True, help="Seconds to wait for CUDA work in flight before locking.")
@click.option("--compress", envvar="GPUSNAP_COMPRESS", type=CompressLevel(), default="fast",
              show_default=True, help="zstd level of the chunks this dump adds: fast (decodes "
              "~7x faster than level 1 on model weights, which level 1 makes ~20% smaller), "
              "1-19, bf16 (byte planes: bf16 weights ~32% smaller, for a slow disk or object "
              "store; restores decode them slower: a 1.3B server 2.30 s against 1.99), or none.")
@click.option("--keep", is_flag=True, help="Keep the work dir (CRIU images and logs) and print "
              "where; it stays until you remove it (on a tmpfs it holds memory).")
@click.option("--tcp-established/--no-tcp-established", default=True, show_default=True,
              help="Process trees: dump open TCP connections (CRIU --tcp-established). Off: a tree "
                   "holding one is refused by CRIU.")
@click.option("--file-locks/--no-file-locks", default=True, show_default=True,
              help="Process trees: dump file locks (CRIU --file-locks). Off: a tree holding one "
                   "is refused by CRIU.")
@click.option("--pages", envvar="GPUSNAP_DUMP_PAGES", type=click.Choice(["auto", "stream", "staged"]),
              default="auto", show_default=True,
              help="Process trees: stream (CRIU sends the pages to gpusnap, stored as they come: "
                   "no pages images in the work dir) or staged (CRIU writes pages images, "
                   "ingested after). auto: stream for process trees, staged for containers.")
@click.option("--ignore-rootfs", is_flag=True, help="Containers: leave the container's "
              "filesystem changes out of the snapshot (as podman's flag); a restore as a new "
              "container starts from its image's filesystem.")
@click.option("--seed", "seed", multiple=True, callback=_seed_paths, metavar="PATH|auto",
              help="A model's .safetensors file, or a directory of them (repeatable): store it "
                   "as a seed while the dump runs (`gpusnap seed add`), so that its tensors go "
                   "to the disk while the CUDA driver copies the GPU's memory and the dump "
                   "writes only what they lack. `auto`: the .safetensors files (or directories "
                   "of them, or Hugging Face model ids in its cache) that the target's command "
                   "line names, looked up inside the target's own root, those its user may "
                   "read. A seed of the same files, unchanged, is used as it is; --json "
                   "reports it under `seed`.")
@click.option("--force", is_flag=True, help="Dump anyway what is refused because a restore "
              "may not bring it back: a process tree sharing a pipe, socket or terminal with "
              "a process outside it (exit 7; the snapshot notes each), a NCCL job that may "
              "use CUDA IPC peer memory (exit 23).")
@click.pass_obj
def command(app, containers, pid, engine, name, leave_running, lock_timeout, compress, keep,
            tcp_established, file_locks, pages, ignore_rootfs, seed, force):
    """Checkpoint CONTAINERS (one snapshot each), or the process tree of --pid, into the store.

    Without --leave-running the original stops for good once its snapshot is committed;
    if anything fails it keeps running, unlocked. Prints one snapshot id a line; --json
    prints an object (a list of them for several containers) with `timings`, the
    seconds of each stage, and `downtime`, the seconds the target was held (CUDA-locked
    or frozen: until it ran again with --leave-running, else until the commit).
    """
    from ..engine import dump, workdir
    targets = [(None, name)] if not containers else [
        (c, f"{name}.{c}" if name and len(containers) > 1 else name) for c in containers]
    requests = [dump.DumpRequest(pid=pid, container=c, engine=engine, name=n,
                                 leave_running=leave_running, lock_timeout_ms=int(lock_timeout * 1000),
                                 force=force, pages=pages, ignore_rootfs=ignore_rootfs,
                                 seed=tuple(seed))
                for c, n in targets]
    plans = [_plan(req, tcp_established, file_locks) for req in requests]   # every check first
    repo = app.repo()                   # a read-only store is refused before the target is touched
    repo.compress_level = compress
    with workdir.keeping() if keep else contextlib.nullcontext([]) as kept:
        try:
            results = [_execute(app, repo, plan, planned) for plan, planned in plans]
        finally:
            for path in kept:
                app.note(f"work dir kept at {path}")
    app.emit(results[0] if len(results) == 1 else results, "\n".join(r["id"] for r in results))


def _plan(req, tcp_established: bool, file_locks: bool):
    """The engine's plan of one dump, with the CRIU options of the flags; and its seconds."""
    from ..engine import dump
    started = time.perf_counter()
    plan = dump.plan(req)
    plan.criu_options.tcp_established = tcp_established
    plan.criu_options.file_locks = file_locks
    return plan, time.perf_counter() - started


def _execute(app, repo, plan, planned: float) -> dict:
    from ..engine import dump
    report: dict = {}
    with app.progress("dump") as progress:
        manifest = dump.execute(plan, repo, progress, report)
    manifest.timings = {"plan": round(planned, 4), **manifest.timings}
    for text in manifest.notes:
        app.note(text)
    seeded = report.get("seed")
    if seeded and seeded.get("auto"):
        if seeded.get("skipped"):
            app.note("--seed auto: not safetensors files, left out: " + ", ".join(seeded["skipped"]))
        if not seeded["sources"]:
            app.note("--seed auto: the target's command line names no .safetensors file it may "
                     "read; no seed")
    if seeded and seeded.get("error"):
        app.note(f"the seed was not stored ({seeded['error']}); the snapshot does not need it")
    elif seeded and seeded.get("id") and not app.as_json and app.verbose:
        app.note(f"seed {seeded['id']}: " + ("in the store already, not read again" if seeded["reused"]
                 else f"{human_bytes(seeded['bytes_new'])} new in the store"))
    if not app.as_json and app.verbose:
        held = f"; the target was held {manifest.downtime:.3f} s" if manifest.downtime is not None else ""
        app.note(f"{human_bytes(manifest.bytes_logical)} of images, "
                 f"{human_bytes(manifest.bytes_new)} new in the store{held}\n"
                 + timings_table(manifest.timings))
    # these fields alone (the whole to_json() lists every chunk of the snapshot)
    return {"id": manifest.id, "name": manifest.name, "bytes_logical": manifest.bytes_logical,
            "bytes_stored": manifest.bytes_stored, "bytes_new": manifest.bytes_new,
            "timings": manifest.timings, "downtime": manifest.downtime,
            "sdk": manifest.sdk.to_json() if manifest.sdk else None, "notes": manifest.notes,
            "seed": seeded}
