import click

from .context import human_bytes


@click.command("ls")
@click.pass_obj
def command(app):
    """List snapshots, oldest first (none where there is no store yet).

    A snapshot whose manifest cannot be read is not listed; a note on stderr names it
    (`gpusnap verify` reports it too)."""
    from ..store import Repository
    from ..store.repository import SnapshotSummary
    snaps = []
    if not Repository.exists(app.store):
        app.note(f"no gpusnap store at {app.store} yet")
    else:
        good, bad = app.repo(create=False).scan()
        snaps = [SnapshotSummary.from_manifest(m) for m in good]
        for exc in bad.values():
            app.note(f"skipped: {exc.message}")
    rows = [f"{'ID':<17} {'NAME':<20} {'CREATED':<26} {'TARGET':<28} {'SIZE':>10}"]
    rows += [f"{s.id:<17} {(s.name or '-'):<20} {s.created:<26} {s.target[:28]:<28} "
             f"{human_bytes(s.bytes_logical):>10}" for s in snaps]
    app.emit([s.__dict__ for s in snaps], "\n".join(rows))
