import click

from .context import human_bytes


@click.command("copy")
@click.argument("snapshots", nargs=-1, required=True)
@click.option("--to", "to", required=True, metavar="STORE",
              help="Destination store: a directory or s3://BUCKET/PREFIX (created if missing).")
@click.pass_obj
def command(app, snapshots, to):
    """Copy SNAPSHOTS (ids or names) from --store to STORE, sending only the chunks STORE
    lacks; every chunk is verified on the way and each snapshot appears last.

    Both stores must be plain, or encrypted with the same --key-file.
    """
    from ..store import transfer
    src = app.repo(create=False)
    ids = [src.resolve(s) for s in snapshots]
    dst = app.repo(store=to)
    transfer.check_compatible(src, dst)
    out = []
    with src.shared_lock(), dst.shared_lock():
        for sid in ids:
            with app.progress(f"copy {sid[:8]}") as progress:
                out.append(transfer.copy_snapshot(src, dst, sid, progress))
    app.emit(out, "\n".join(
        f"{o['id']} {o['chunks_copied']} chunks copied ({human_bytes(o['bytes_copied'])}), "
        f"{o['chunks_present']} already there" for o in out))
