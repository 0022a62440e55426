import contextlib
import sys

import click

from .context import human_bytes


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--max-bytes", type=int, default=None,
              help="Refuse an archive that holds more chunk bytes than this (default 1 TiB).")
@click.pass_obj
def command(app, file, max_bytes):
    """Add the snapshot in FILE (made by `gpusnap export`) to the store; prints its id.

    FILE `-` reads the archive from stdin. Every chunk is verified before it is stored
    and the snapshot appears only once all are in; importing a snapshot the store
    already holds changes nothing.
    """
    from ..store import archive
    repo = app.repo()
    source = (contextlib.nullcontext(sys.stdin.buffer) if file == "-" else open(file, "rb"))
    with repo.shared_lock(), source as src:
        result = archive.import_(repo, src, max_bytes=max_bytes or archive.DEFAULT_MAX_BYTES)
    note = " (already in the store)" if result.already_present else ""
    app.emit(result.to_dict(), result.id)
    app.note(f"{result.chunks_imported} chunks imported, {result.chunks_present} already present, "
             f"{human_bytes(result.bytes_imported)} written{note}")
