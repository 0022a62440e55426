import click

from .complete import snapshot_argument
from .context import human_bytes, timings_table


def _file_rows(entries: list[dict]) -> list[dict]:
    """Each stored file as path, size, mode and its chunk count (the ids stay internal)."""
    return [{"path": e["path"], "size": e["size"], "mode": e.get("mode"),
             "chunks": len(e["chunks"])} for e in entries]


@click.command("inspect")
@snapshot_argument()
@click.option("--files", is_flag=True, help="Also list the image and log files with their sizes "
              "and chunk counts (the JSON always has them).")
@click.pass_obj
def command(app, snapshot, files):
    """Show what a snapshot holds: target, pids, sizes, CRIU and kernel, GPUs, timings.

    In JSON, `files` and `logs` are always lists of {path, size, mode, chunks}, chunks
    being a count.
    """
    repo = app.repo(create=False)
    m = repo.load(repo.resolve(snapshot))
    m["files"], m["logs"] = _file_rows(m.get("files", [])), _file_rows(m.get("logs", []))
    t = m["target"]
    lines = [
        f"id:        {m['id']}", f"name:      {m.get('name') or '-'}", f"created:   {m['created']}",
        f"target:    {t['kind']} {t.get('name') or ''} (root pid {t['root_pid']}, {len(m['pids'])} processes)",
        f"criu:      {m['criu_version']} on kernel {m['kernel']}",
        f"size:      {human_bytes(m['bytes_logical'])} logical, {human_bytes(m['bytes_stored'])} stored, "
        f"{human_bytes(m['bytes_new'])} new",
        f"files:     {len(m['files'])} images, {len(m['logs'])} logs",
        f"gpus:      {', '.join(g['name'] for g in (m.get('cuda') or {}).get('gpus', [])) or 'none'}",
        "timings:", timings_table(m.get("timings", {}))]
    if files:
        lines.append("files:")
        lines += [f"  {f['size']:>14}  {f['chunks']:>6} chunks  {kind}{f['path']}"
                  for kind, group in (("", m["files"]), ("log: ", m["logs"])) for f in group]
    app.emit(m, "\n".join(lines))
