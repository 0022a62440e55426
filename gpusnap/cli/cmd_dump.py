import click

from .context import human_bytes, timings_table


@click.command("dump")
@click.argument("container", required=False)
@click.option("--pid", type=int, help="Dump the process tree rooted at PID.")
@click.option("--engine", type=click.Choice(["docker", "podman"]), help="Container engine (default: detect).")
@click.option("--name", help="A name for the snapshot (restore accepts it).")
@click.option("--leave-running", is_flag=True, help="Keep the original running after the dump.")
@click.option("--lock-timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for CUDA work in flight before locking.")
@click.option("--force", is_flag=True, help="Dump a NCCL job that may use CUDA IPC peer "
              "memory anyway (the driver may not restore it).")
@click.pass_obj
def command(app, container, pid, engine, name, leave_running, lock_timeout, force):
    """Checkpoint CONTAINER, or the process tree of --pid, into the store.

    Without --leave-running the original stops for good once its snapshot is committed;
    if anything fails it keeps running, unlocked.
    """
    import time

    from ..engine import dump
    started = time.perf_counter()
    req = dump.DumpRequest(pid=pid, container=container, engine=engine, name=name,
                           leave_running=leave_running, lock_timeout_ms=int(lock_timeout * 1000),
                           force=force)
    plan = dump.plan(req)
    planned = time.perf_counter() - started
    repo = app.repo()
    with app.progress("dump") as progress:
        manifest = dump.execute(plan, repo, progress)
    manifest["timings"] = {"plan": round(planned, 4), **manifest["timings"]}
    app.emit({"id": manifest["id"], "name": manifest["name"], "bytes_logical": manifest["bytes_logical"],
              "bytes_stored": manifest["bytes_stored"], "bytes_new": manifest["bytes_new"],
              "timings": manifest["timings"], "sdk": manifest.get("sdk"),
              "notes": manifest.get("notes", [])}, manifest["id"])
    for text in manifest.get("notes", []):
        app.note(text)
    if not app.as_json and app.verbose:
        app.note(f"{human_bytes(manifest['bytes_logical'])} of images, "
                 f"{human_bytes(manifest['bytes_new'])} new in the store\n"
                 + timings_table(manifest["timings"]))
