import click

from .context import human_bytes, timings_table
from .target_arg import split_target


def suspend_options(fn):
    """The options of a suspend (here and in `gpusnap switch`, for its OUT)."""
    for option in reversed([
            click.option("--engine", type=click.Choice(["docker", "podman"]),
                         help="Container engine (default: detect)."),
            click.option("--lock-timeout", type=float, default=10.0, show_default=True,
                         help="Seconds to wait for CUDA work in flight before locking."),
            click.option("--force", is_flag=True, help="Suspend a NCCL job that may use CUDA "
                         "IPC peer memory anyway (the driver may not bring it back).")]):
        fn = option(fn)
    return fn


@click.command("suspend")
@click.argument("target", metavar="PID|CONTAINER")
@suspend_options
@click.pass_obj
def command(app, target, engine, lock_timeout, force):
    """Park PID (its process tree) or CONTAINER in place: its GPU memory moves to host
    memory and the GPU is free; the processes stay alive. `gpusnap resume` undoes it.

    SDK servers drop their weights instead (read back on resume). Anything that fails
    leaves the target running as it was.
    """
    from ..engine import park
    pid, container = split_target(target)
    req = park.SuspendRequest(pid=pid, container=container, engine=engine,
                              lock_timeout_ms=int(lock_timeout * 1000), force=force)
    result = park.execute_suspend(park.plan_suspend(req))
    app.emit(result, str(result["pid"]))
    for text in result["notes"]:
        app.note(text)
    if not app.as_json and app.verbose:
        app.note(f"{human_bytes(result['host_memory'])} of host memory held\n"
                 + timings_table(result["timings"]))
