import click

from .context import human_bytes


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted, delete nothing.")
@click.pass_obj
def command(app, dry_run):
    """Delete chunks that no snapshot references (under the exclusive store lock), and what
    killed gpusnaps left: their work dirs, agent sockets, failed logs beyond the newest 20."""
    from ..engine import imagecache, workdir
    repo = app.repo(create=False)
    with repo.exclusive_lock():
        plan = repo.gc_plan()
        leftovers = workdir.sweep_plan(repo.path)
        if not dry_run:
            repo.gc_execute(plan)
            imagecache.drop(repo.path, keep=set(repo.snapshot_ids()))    # caches of removed snapshots
            workdir.sweep(leftovers)
    verb = "would free" if dry_run else "freed"
    counts = {kind: len(paths) for kind, paths in leftovers.items()}
    app.emit({"chunks": len(plan["chunks"]), "bytes": plan["bytes"], "temps": len(plan["temps"]),
              "leftovers": counts, "dry_run": dry_run},
             f"{verb} {len(plan['chunks'])} chunks, {human_bytes(plan['bytes'])}"
             + (f"; {', '.join(f'{n} {k}' for k, n in counts.items() if n)}" if any(counts.values()) else ""))
