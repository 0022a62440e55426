import click

from .context import human_bytes, timings_table


@click.command("inspect")
@click.argument("snapshot")
@click.option("--files", is_flag=True, help="Also list the image files and their chunk counts.")
@click.pass_obj
def command(app, snapshot, files):
    """Show what a snapshot holds: target, pids, sizes, CRIU and kernel, GPUs, timings."""
    repo = app.repo(create=False)
    m = repo.load(repo.resolve(snapshot))
    data = m.to_json()
    if not files:
        del data["logs"]
        data["files"] = len(m.files)
    t = m.target
    gpus = [g.get("name") or g["uuid"] for g in m.cuda.gpus] if m.cuda else []
    text = "\n".join([
        f"id:        {m.id}", f"name:      {m.name or '-'}", f"created:   {m.created}",
        f"target:    {t.kind} {t.name or ''} (root pid {t.root_pid}, {len(m.pids)} processes)",
        f"criu:      {m.criu_version or '?'} on kernel {m.kernel or '?'}",
        f"size:      {human_bytes(m.bytes_logical)} logical, {human_bytes(m.bytes_stored)} stored, "
        f"{human_bytes(m.bytes_new)} new",
        f"gpus:      {', '.join(map(str, gpus)) or 'none'}",
        "timings:", timings_table(m.timings)])
    app.emit(data, text)
