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
    m = repo.load_ref(snapshot)
    data = m.to_json()
    data["files"], data["logs"] = _file_rows(data.get("files", [])), _file_rows(data.get("logs", []))
    t = m.target
    gpus = [g.get("name") or g["uuid"] for g in m.cuda.gpus] if m.cuda else []
    lines = [
        f"id:        {m.id}", f"name:      {m.name or '-'}", f"created:   {m.created}",
        f"target:    {t.kind} {t.name or ''} (root pid {t.root_pid}, {len(m.pids)} processes)",
        f"criu:      {m.criu_version or '?'} on kernel {m.kernel or '?'}",
        f"size:      {human_bytes(m.bytes_logical)} logical, {human_bytes(m.bytes_stored)} stored, "
        f"{human_bytes(m.bytes_new)} new",
        f"files:     {len(data['files'])} images, {len(data['logs'])} logs",
        f"gpus:      {', '.join(map(str, gpus)) or 'none'}",
        "timings:", timings_table(m.timings)]
    if files:
        lines.append("files:")
        lines += [f"  {f['size']:>14}  {f['chunks']:>6} chunks  {kind}{f['path']}"
                  for kind, group in (("", data["files"]), ("log: ", data["logs"])) for f in group]
    app.emit(data, "\n".join(lines))
