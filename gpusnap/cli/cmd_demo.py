import click

from .context import human_bytes, timings_table


@click.command("demo")
@click.option("--mib", type=int, default=256, show_default=True, help="Memory the workload holds.")
@click.option("--cpu", is_flag=True, help="Use the CPU workload even where a GPU is present.")
@click.pass_obj
def command(app, mib, cpu):
    """Start a workload holding known data, dump it, restore it, check the data.

    Uses a CUDA workload when a GPU is present, else a CPU process tree (pipes, sockets,
    threads, a mapped file). Prints a per-stage timing table.
    """
    from ..engine import demo
    app.note("starting the workload, dumping, restoring ...")
    result = demo.run(app.repo(), mib=mib, cuda=False if cpu else None)
    text = "\n".join([
        f"workload:  {result.workload} ({mib} MiB of known data)",
        f"snapshot:  {result.snapshot} ({human_bytes(result.bytes_logical)} of images, "
        f"{human_bytes(result.bytes_new)} new in the store)",
        f"restored:  pid {result.restored_pid}, data intact: {result.report.get('data_ok')}",
        "stages:", timings_table(result.stages)])
    app.emit(result.__dict__, text)
