import click

from .context import human_bytes


@click.command("ls")
@click.option("--name", help="Only snapshots of this name.")
@click.option("--kind", type=click.Choice(["process", "docker", "podman"]),
              help="Only snapshots of this kind of target.")
@click.option("--latest", type=click.IntRange(min=1), metavar="N",
              help="Only the N newest (after --name and --kind).")
@click.pass_obj
def command(app, name, kind, latest):
    """List snapshots, oldest first (none where there is no store yet).

    Order and "newest" follow the store's commit sequence (SEQ). A snapshot whose
    manifest cannot be read is not listed; a note on stderr names it (`gpusnap verify`
    reports it too)."""
    from ..store import Repository
    from ..store.repository import SnapshotSummary
    snaps = []
    if not Repository.exists(app.store):
        app.note(f"no gpusnap store at {app.store} yet")
    else:
        good, bad = app.repo(create=False).scan()
        for exc in bad.values():
            app.note(f"skipped: {exc.message}")
        snaps = [s for s in (SnapshotSummary.from_manifest(m) for m in good)
                 if (name is None or s.name == name) and (kind is None or s.kind == kind)]
    if latest:
        snaps = snaps[-latest:]
    rows = [f"{'ID':<17} {'SEQ':>5} {'NAME':<20} {'CREATED':<26} {'TARGET':<28} {'SIZE':>10}"]
    rows += [f"{s.id:<17} {s.seq:>5} {(s.name or '-'):<20} {s.created:<26} {s.target[:28]:<28} "
             f"{human_bytes(s.bytes_logical):>10}" for s in snaps]
    app.emit([s.__dict__ for s in snaps], "\n".join(rows))
