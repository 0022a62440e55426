import click

from .context import human_bytes


@click.command("ls")
@click.pass_obj
def command(app):
    """List snapshots, oldest first (none where there is no store yet)."""
    from ..store import Repository
    if not Repository.exists(app.store):
        app.note(f"no gpusnap store at {app.store} yet")
        snaps = []
    else:
        snaps = app.repo(create=False).list()
    rows = [f"{'ID':<17} {'NAME':<20} {'CREATED':<26} {'TARGET':<28} {'SIZE':>10}"]
    rows += [f"{s.id:<17} {(s.name or '-'):<20} {s.created:<26} {s.target[:28]:<28} "
             f"{human_bytes(s.bytes_logical):>10}" for s in snaps]
    app.emit([s.__dict__ for s in snaps], "\n".join(rows))
