import click

from .complete import snapshot_argument

from ..errors import IntegrityError


@click.command("verify")
@snapshot_argument("snapshots", nargs=-1)
@click.pass_obj
def command(app, snapshots):
    """Re-hash every chunk of SNAPSHOTS (default: all); exit 42 on any bad or missing chunk."""
    repo = app.repo(create=False)
    with repo.shared_lock():
        ids = [repo.resolve(s) for s in snapshots] if snapshots else None
        with app.progress("verify") as progress:
            report = repo.verify(ids, progress)
    text = f"{report['snapshots']} snapshots, {report['chunks_checked']} chunks checked, " \
           f"{len(report['bad'])} bad"
    app.emit(report, text)
    for bad in report["bad"]:
        app.note(f"  bad: {bad.get('chunk') or bad.get('snapshot')}: {bad['error']}")
    if report["bad"]:
        raise IntegrityError(f"{len(report['bad'])} problems found")
