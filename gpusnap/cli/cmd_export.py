import click

from .complete import snapshot_argument

from .context import human_bytes


@click.command("export")
@snapshot_argument()
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
@click.pass_obj
def command(app, snapshot, file):
    """Write SNAPSHOT and every chunk it uses to FILE, one tar that `gpusnap import` reads.

    FILE holds process memory as the store does: it is created owner-only (0600), and
    appears only once complete.
    """
    from ..store import archive
    repo = app.repo(create=False)
    with repo.shared_lock():
        result = archive.export_to_path(repo, repo.resolve(snapshot), file)
    result["file"] = file
    app.emit(result, f"exported {result['id']} to {file} "
                     f"({result['chunks']} chunks, {human_bytes(result['bytes'])})")
