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
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--name", help="A name to recognise the seed by in `gpusnap seed ls`.")
@click.pass_obj
def add(app, paths, name):
    """Store the tensors of PATHS, cut as a dump cuts memory pages: .safetensors files,
    or directories (every *.safetensors file under them: a model's shards)."""
    import os
    import time
    started = time.perf_counter()
    from ..store.seed import weight_files
    files = weight_files(paths)
    repo = app.repo()
    total = sum(os.path.getsize(f) for f in files)      # regular files (weight_files)
    with repo.shared_lock(), app.progress("seed", total) as progress:
        record, tally = repo.add_seed(files, name=name, progress=progress)
    report = {"id": record.id, "name": record.name, "files": list(record.sources),
              "chunks": len(record.chunk_sizes()), "bytes_seeded": record.bytes_seeded,
              "bytes_stored": tally.stored, "bytes_new": tally.new,
              "seconds": round(time.perf_counter() - started, 3)}
    app.emit(report, f"seed {record.id}: {human_bytes(record.bytes_seeded)} of tensors in "
             f"{report['chunks']} chunks, {human_bytes(tally.new)} new in the store")


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
