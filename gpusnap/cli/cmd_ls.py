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

    Order and "newest" follow the store's commit sequence (SEQ).
    """
    from ..store import Repository
    if not Repository.exists(app.store):
        app.note(f"no gpusnap store at {app.store} yet")
        snaps = []
    else:
        snaps = [s for s in app.repo(create=False).list()
                 if (name is None or s.name == name) and (kind is None or s.kind == kind)]
    if latest:
        snaps = snaps[-latest:]
    rows = [f"{'ID':<17} {'SEQ':>5} {'NAME':<20} {'CREATED':<26} {'TARGET':<28} {'SIZE':>10}"]
    rows += [f"{s.id:<17} {s.seq:>5} {(s.name or '-'):<20} {s.created:<26} {s.target[:28]:<28} "
             f"{human_bytes(s.bytes_logical):>10}" for s in snaps]
    app.emit([s.__dict__ for s in snaps], "\n".join(rows))
