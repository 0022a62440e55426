import click

from .complete import snapshot_argument

from .context import timings_table


@click.command("restore")
@snapshot_argument()
@click.option("--gpu", "gpus", help="GPUs to restore onto, by index or UUID, comma-separated "
              "(as CUDA_VISIBLE_DEVICES). Default: the snapshot's own, else a free one of the same chip.")
@click.option("--name", help="Containers: restore as a new container NAME (default: into the "
              "recorded container if it exists and is stopped, else a new one of its name).")
@click.option("--device", "devices", multiple=True, metavar="OLD:NEW",
              help="Containers: give the new container host device NEW where it had OLD "
                   "(same path inside). --gpu does this for the GPU nodes. Repeatable.")
@click.option("--pages", type=click.Choice(["auto", "uffd", "criu"]), default="auto", show_default=True,
              envvar="GPUSNAP_PAGES",
              help="How memory gets into the restored processes: uffd (gpusnap places it from "
                   "the store, in parallel, through userfaultfd), criu (CRIU writes it from "
                   "materialised images), auto (uffd where the host allows it).")
@click.option("--keep", is_flag=True, help="Keep the work dir (materialised images, CRIU's "
              "restore log) and print where; it stays until you remove it.")
@click.option("--standby", is_flag=True, help="Processes: restore with the CUDA state left "
              "checkpointed (no GPU memory used); `gpusnap resume PID` finishes it.")
@click.pass_obj
def command(app, snapshot, gpus, name, devices, pages, keep, standby):
    """Restore SNAPSHOT (an id, a unique id prefix, or a name).

    Prints the restored root pid; for a container, its name, id and init pid.
    """
    import contextlib
    import time

    from ..engine import restore, workdir
    started = time.perf_counter()
    repo = app.repo(create=False)
    opened = time.perf_counter() - started     # of plan: an s3 store's client and config
    req = restore.RestoreRequest(snapshot=snapshot, gpus=gpus.split(",") if gpus else None,
                                 name=name, devices=list(devices) or None, pages=pages,
                                 standby=standby)
    plan = restore.plan(req, repo)
    planned = time.perf_counter() - started
    for note in plan.notes:
        app.note(note)
    total = plan.manifest.bytes_logical
    with workdir.keeping() if keep else contextlib.nullcontext([]) as kept, \
            app.progress("restore", total) as progress:
        try:
            result = restore.execute(plan, repo, progress)
        finally:
            for path in kept:
                app.note(f"work dir kept at {path}")
    result["timings"] = {"plan": round(planned, 4), **result["timings"]}
    result["command_s"] = round(time.perf_counter() - started, 4)   # all of it, in this process
    result["store_open_s"] = round(opened, 4)
    container = result.get("container")
    text = (f"{container['name']} {container['id'][:12]} {result['pid']}" if container
            else str(result["pid"]))
    app.emit(result, text)
    if not app.as_json and app.verbose:
        app.note(timings_table(result["timings"]))
