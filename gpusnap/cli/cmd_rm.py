import click

from .complete import snapshot_argument


@click.command("rm")
@snapshot_argument("snapshots", nargs=-1, required=True)
@click.pass_obj
def command(app, snapshots):
    """Remove SNAPSHOTS. Their chunks are freed by the next `gpusnap gc`."""
    from ..engine import imagecache
    repo = app.repo(create=False)
    with repo.exclusive_lock():
        ids = [repo.resolve(s) for s in snapshots]
        removed = repo.remove(ids)
        imagecache.drop(repo.path, removed)
    app.emit({"removed": removed}, "\n".join(f"removed {i}" for i in removed))
