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
    if not files:
        count = len(m.get("files", []))
        m = {k: v for k, v in m.items() if k not in ("files", "logs")}
        m["files"] = count
    t = m["target"]
    text = "\n".join([
        f"id:        {m['id']}", f"name:      {m.get('name') or '-'}", f"created:   {m['created']}",
        f"target:    {t['kind']} {t.get('name') or ''} (root pid {t['root_pid']}, {len(m['pids'])} processes)",
        f"criu:      {m['criu_version']} on kernel {m['kernel']}",
        f"size:      {human_bytes(m['bytes_logical'])} logical, {human_bytes(m['bytes_stored'])} stored, "
        f"{human_bytes(m['bytes_new'])} new",
        f"gpus:      {', '.join(g['name'] for g in (m.get('cuda') or {}).get('gpus', [])) or 'none'}",
        "timings:", timings_table(m.get("timings", {}))])
    app.emit(m, text)
