import click

from .context import human_bytes


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted, delete nothing.")
@click.pass_obj
def command(app, dry_run):
    """Delete chunks that no snapshot references (under the exclusive store lock)."""
    from ..engine import imagecache
    repo = app.repo(create=False)
    with repo.exclusive_lock():
        plan = repo.gc_plan()
        if not dry_run:
            repo.gc_execute(plan)
            imagecache.drop(repo.path, keep=set(repo.snapshot_ids()))    # caches of removed snapshots
    verb = "would free" if dry_run else "freed"
    app.emit({"chunks": len(plan["chunks"]), "bytes": plan["bytes"], "temps": len(plan["temps"]),
              "dry_run": dry_run},
             f"{verb} {len(plan['chunks'])} chunks, {human_bytes(plan['bytes'])}")
