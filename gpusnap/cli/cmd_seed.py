import click

from .context import human_bytes


@click.group("seed")
def command():
    """A model's weights in the store ahead of its server's first dump.

    The first dump of an LLM server writes its weights again, at the disk's pace. Seed the
    store with the model's .safetensors files when the model lands on the node: a dump
    then finds the chunks of every tensor the CUDA driver's host copy laid out from a page
    start, and writes only the rest. Seeds are kept from gc until `gpusnap seed rm`; they
    are not snapshots (ls, restore, export and copy do not see them).
    """


@command.command("add")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--name", help="A name to recognise the seed by in `gpusnap seed ls`.")
@click.option("--pid", type=int, help="Also the weights the process tree of PID names: "
              "what `dump --seed auto` finds (.safetensors files, directories of them or "
              "Hugging Face ids on its command line, inside its own root, those its user may "
              "read). A seed of the same files, unchanged, is not made again (`reused`).")
@click.option("--container", metavar="NAME", help="As --pid, for the processes of a container.")
@click.option("--engine", type=click.Choice(["docker", "podman"]), envvar="GPUSNAP_ENGINE",
              help="With --container: its engine (default: whichever knows the name).")
@click.pass_obj
def add(app, paths, name, pid, container, engine):
    """Store the tensors of PATHS, cut as a dump cuts memory pages: .safetensors files,
    or directories (every *.safetensors file under them: a model's shards); or those a
    running server names (--pid, --container), as soon as it has started, so that its
    first dump writes only what the weights lack."""
    import os
    import time
    started = time.perf_counter()
    from ..errors import UsageError
    from ..store.seed import already_seeded, sources_of, weight_files
    if not paths and pid is None and container is None:
        raise UsageError("give the weights' PATHS, or --pid or --container of a server naming them")
    if pid is not None and container is not None:
        raise UsageError("give --pid or --container, not both")
    files = weight_files(paths)
    sources = sources_of(files)
    found = skipped = None
    if pid is not None or container is not None:
        found, skipped = _found(pid, container, engine)
    try:
        if found is not None:
            if not found.paths and not files:
                raise UsageError("the target's command line names no .safetensors file its user "
                                 "may read" + (f" (not safetensors: {', '.join(skipped)})" if skipped else ""),
                                 hint="give the model's .safetensors files or directory as PATHS")
            files, sources = files + found.paths, sources + found.sources
        repo = app.repo()
        total = sum(os.path.getsize(f) for f in files)      # regular files (weight_files, discovery)
        with repo.shared_lock():
            record = already_seeded(repo.seeds()[0], files, sources) if found is not None else None
            reused = record is not None
            if not reused:
                with app.progress("seed", total) as progress:
                    record, tally = repo.add_seed(files, name=name, progress=progress, sources=sources)
    finally:
        if found is not None:
            found.close()
    new = 0 if reused else tally.new
    report = {"id": record.id, "name": record.name, "files": list(record.sources),
              "chunks": len(record.chunk_sizes()), "bytes_seeded": record.bytes_seeded,
              "bytes_stored": 0 if reused else tally.stored, "bytes_new": new,
              "seconds": round(time.perf_counter() - started, 3)}
    if found is not None:
        report.update(reused=reused, skipped=skipped)
    app.emit(report, f"seed {record.id}: {human_bytes(record.bytes_seeded)} of tensors in "
             f"{report['chunks']} chunks, " + ("in the store already, not read again" if reused
                                               else f"{human_bytes(new)} new in the store"))


def _found(pid, container, engine):
    """The weights the target names (engine/seeding.py: discover), held open."""
    from ..engine import seeding, strategies
    from ..engine.plans import DumpRequest
    _strategy, target = strategies.resolve(DumpRequest(pid=pid, container=container, engine=engine))
    return seeding.discover(target.pids)


@command.command("ls")
@click.pass_obj
def ls(app):
    """List the seeds (id, name, bytes of tensors, files)."""
    repo = app.repo(create=False)
    good, bad = repo.seeds()
    rows = [{"id": s.id, "name": s.name, "created": s.created, "bytes_seeded": s.bytes_seeded,
             "chunks": len(s.chunk_sizes()), "files": list(s.sources)} for s in good]
    for sid, exc in bad.items():
        app.note(f"seed record {sid} does not load: {exc.message}")
    app.emit({"seeds": rows, "unreadable": sorted(bad)},
             "\n".join(f"{r['id']}  {r['created'][:19]}  {human_bytes(r['bytes_seeded']):>9}  "
                       f"{r['name'] or '-'}  {' '.join(r['files'])}" for r in rows) or "no seeds")


@command.command("rm")
@click.argument("ids", nargs=-1, required=True)
@click.pass_obj
def rm(app, ids):
    """Remove seeds by id. Their chunks go at the next `gpusnap gc`, but for those a
    snapshot or another seed uses."""
    repo = app.repo(create=False)
    with repo.exclusive_lock():
        removed = repo.remove_seeds(ids)
    app.emit({"removed": removed}, "\n".join(f"removed seed {i}" for i in removed))
