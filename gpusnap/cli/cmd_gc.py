import click

from .context import human_bytes


def prune(repo, dry_run: bool, forget: list[str] = ()) -> dict:
    """Remove the forget snapshots, then delete every chunk no snapshot or seed uses (the caller
    holds the exclusive lock); with dry_run, only say what that would free."""
    from ..engine import imagecache
    plan = repo.gc_plan(without=forget)
    if not dry_run:
        if forget:
            imagecache.drop(repo.path, repo.remove(forget))
        repo.gc_execute(plan)
        imagecache.drop(repo.path, keep=set(repo.snapshot_ids()))    # caches of removed snapshots
    return {"chunks": len(plan["chunks"]), "bytes": plan["bytes"], "temps": len(plan["temps"]),
            "chunks_kept": plan["kept"], "dry_run": dry_run}


def freed_text(report: dict) -> str:
    verb = "would free" if report["dry_run"] else "freed"
    kept = report.get("chunks_kept")
    return (f"{verb} {report['chunks']} chunks, {human_bytes(report['bytes'])}"
            + (f" ({kept} unused chunks stay, in packs with used ones)" if kept else ""))


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted, delete nothing.")
@click.pass_obj
def command(app, dry_run):
    """Delete chunks that no snapshot or seed references (under the exclusive store lock), and what
    killed gpusnaps left: their work dirs, agent sockets, failed logs beyond the newest 20."""
    from ..engine import workdir
    repo = app.repo(create=False)
    with repo.exclusive_lock():
        report = prune(repo, dry_run)
        leftovers = workdir.sweep_plan(repo.path)
        if not dry_run:
            workdir.sweep(leftovers)
    counts = {kind: len(paths) for kind, paths in leftovers.items()}
    report["leftovers"] = counts
    app.emit(report, freed_text(report)
             + (f"; {', '.join(f'{n} {k}' for k, n in counts.items() if n)}" if any(counts.values()) else ""))
