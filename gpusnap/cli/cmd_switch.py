import click

from .cmd_suspend import suspend_options
from .context import timings_table
from .target_arg import split_target


@click.command("switch")
@click.argument("out", metavar="OUT")
@click.argument("into", metavar="IN")
@click.option("--gpu", "gpus", help="GPUs to resume IN onto, by index or UUID, comma-separated "
              "(as for resume). Default: its own, else a free one of the same chip.")
@click.option("--sequential", is_flag=True, help="Suspend OUT before IN resumes even where "
              "IN fits beside it (by default the two overlap where it fits).")
@suspend_options
@click.pass_obj
def command(app, out, into, gpus, sequential, engine, lock_timeout, force):
    """Give the GPU from OUT to IN: suspend OUT (PID or CONTAINER, running) and resume IN
    (parked by suspend or restore --standby), as one operation.

    Where IN fits on its GPUs beside OUT, its resume runs while OUT suspends. All or
    nothing: if either half fails, OUT runs and IN is parked, as before.
    """
    from ..engine import park, switch
    o_pid, o_container = split_target(out)
    i_pid, i_container = split_target(into)
    req = switch.SwitchRequest(
        out=park.SuspendRequest(pid=o_pid, container=o_container, engine=engine,
                                lock_timeout_ms=int(lock_timeout * 1000), force=force),
        into=park.ResumeRequest(pid=i_pid, container=i_container,
                                gpus=gpus.split(",") if gpus else None),
        sequential=sequential)
    plan = switch.plan_switch(req)
    result = switch.execute_switch(plan)
    app.emit(result, f"{result['out']['pid']} {result['in']['pid']}")
    for text in result["notes"]:
        app.note(text)
    if not app.as_json and app.verbose:
        app.note(f"{plan.reason}\n" + timings_table(result["timings"]))
