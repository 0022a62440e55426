import click

from .context import timings_table
from .target_arg import split_target


@click.command("resume")
@click.argument("target", metavar="PID|CONTAINER")
@click.option("--gpu", "gpus", help="GPUs to resume onto, by index or UUID, comma-separated "
              "(as CUDA_VISIBLE_DEVICES). Default: its own, else a free one of the same chip.")
@click.pass_obj
def command(app, target, gpus):
    """Resume PID or CONTAINER parked by `gpusnap suspend` or `gpusnap restore --standby`:
    its CUDA state goes back onto a GPU and it runs on; SDK servers read their weights back.

    A resume that fails leaves it parked, to try again.
    """
    from ..engine import park
    pid, container = split_target(target)
    req = park.ResumeRequest(pid=pid, container=container,
                             gpus=gpus.split(",") if gpus else None)
    plan = park.plan_resume(req)
    for note in plan.notes:
        app.note(note)
    result = park.execute_resume(plan)
    app.emit(result, str(result["pid"]))
    if not app.as_json and app.verbose:
        app.note(timings_table(result["timings"]))
