import click

from .context import timings_table


@click.command("restore")
@click.argument("snapshot")
@click.option("--gpu", "gpus", help="GPUs to restore onto, by index or UUID, comma-separated "
              "(as CUDA_VISIBLE_DEVICES). Default: the snapshot's own, else a free one of the same chip.")
@click.pass_obj
def command(app, snapshot, gpus):
    """Restore SNAPSHOT (an id, a unique id prefix, or a name); prints the restored root pid."""
    from ..engine import restore
    repo = app.repo()
    req = restore.RestoreRequest(snapshot=snapshot, gpus=gpus.split(",") if gpus else None)
    plan = restore.plan(req, repo)
    for note in plan.notes:
        app.note(note)
    total = plan.manifest.get("bytes_logical")
    with app.progress("restore", total) as progress:
        result = restore.execute(plan, repo, progress)
    app.emit(result, str(result["pid"]))
    if not app.as_json and app.verbose:
        app.note(timings_table(result["timings"]))
