import click

from .complete import snapshot_argument

from .context import human_bytes


@click.command("warm")
@snapshot_argument("snapshots", nargs=-1)
@click.option("--pages", type=click.Choice(["auto", "uffd", "criu"]), default="auto", show_default=True,
              envvar="GPUSNAP_PAGES",
              help="The page path whose images to prepare, as restore chooses it: uffd (all but "
                   "the lazy pages, and the fill's plan), criu (every image).")
@click.option("--drop", is_flag=True, help="Remove the warm caches of SNAPSHOTS (all without any).")
@click.pass_obj
def command(app, snapshots, pages, drop):
    """Keep SNAPSHOTS' images prepared on this host, so restores skip that step.

    The images are verified as they are written; they take their size in memory
    (gpusnap's work dir: a huge-page tmpfs at /run/gpusnap-work as root, else /dev/shm;
    GPUSNAP_WORKDIR moves it): all of it for --pages criu, only what CRIU reads itself
    for uffd. rm and gc drop the caches they orphan. From an s3:// store, every chunk of
    SNAPSHOTS comes into the node's chunk cache as well (--cache). Through gpusnapd
    (GPUSNAP_SOCKET) this prefetches for the daemon's restores.
    """
    from ..engine import imagecache, pagepath
    repo = app.repo(create=False)
    ids = [repo.resolve(s) for s in snapshots]
    if drop:
        with repo.exclusive_lock():             # no restore is reading a cache meanwhile
            dropped = imagecache.drop(repo.path, ids or None)
        app.emit({"dropped": dropped}, "\n".join(f"dropped {i}" for i in dropped))
        return
    if not ids:
        raise click.UsageError("name at least one snapshot (or --drop)")
    out = []
    for sid in ids:
        m = repo.load(sid)
        kind, _notes = pagepath.choose(pages, m.target.kind)
        with app.progress(f"warm {sid[:8]}", m.bytes_logical) as progress:
            path = imagecache.warm(repo, m, progress, kind)
        out.append({"id": sid, "path": path, "bytes": m.bytes_logical, "pages": kind})
    app.emit(out, "\n".join(f"{o['id']} {human_bytes(o['bytes'])} ({o['pages']}) at {o['path']}"
                            for o in out))
