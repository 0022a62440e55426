import os
import sys

import click

from ..errors import UsageError
from .complete import snapshot_argument
from .context import human_bytes


@click.command("export")
@snapshot_argument()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.pass_obj
def command(app, snapshot, file):
    """Write SNAPSHOT and every chunk it uses to FILE, one tar that `gpusnap import` reads.

    FILE holds process memory as the store does: it is created owner-only (0600), and
    appears only once complete. FILE `-` writes the tar to stdout (to pipe it: ssh,
    zstd, ...); the report then goes to stderr, JSON included.
    """
    from ..store import archive
    to_stdout = file == "-"
    if not to_stdout and not os.path.isdir(os.path.dirname(os.path.abspath(file))):
        raise UsageError(f"no directory {os.path.dirname(os.path.abspath(file))} to write {file} in")
    if to_stdout and sys.stdout.isatty():
        raise UsageError("refusing to write a tar to a terminal", hint="redirect or pipe stdout")
    repo = app.repo(create=False)
    with repo.shared_lock():
        sid = repo.resolve(snapshot)
        if to_stdout:
            result = archive.export(repo, sid, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        else:
            result = archive.export_to_path(repo, sid, file)
    result["file"] = file
    text = (f"exported {result['id']} to {'stdout' if to_stdout else file} "
            f"({result['chunks']} chunks, {human_bytes(result['bytes'])})")
    app.emit(result, text, err=to_stdout)
