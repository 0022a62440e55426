import click

from .context import human_bytes


@click.command("ps")
@click.pass_obj
def command(app):
    """List what gpusnap holds on this host: suspended targets, standbys, restored trees,
    and (state `recovered`) what was done after a gpusnap died mid-dump or mid-restore:
    the target resumed or killed, an unreported restored tree killed.

    Entries whose process is gone are dropped; the newest 20 recoveries are kept.
    """
    import time

    from ..engine import intent, park
    rows = park.ps() + [_recovered(n) for n in intent.notes()]
    now = time.time()
    lines = [f"{'PID':>8}  {'STATE':<10} {'KIND':<8} {'HOST MEM':>10} {'FOR':>8}  NAME"]
    for e in rows:
        since = f"{now - e['since']:.0f} s" if e.get("since") else "-"
        name = (e.get("container") or {}).get("name") or e.get("name") or ""
        snap = f" (from {e['snapshot'][:12]})" if e.get("snapshot") else ""
        lines.append(f"{e['pid']:>8}  {e['state']:<10} {e['kind']:<8} "
                     f"{human_bytes(e['host_memory']):>10} {since:>8}  {name}{snap}")
    app.emit(rows, "\n".join(lines))


def _recovered(note: dict) -> dict:
    return {"pid": note.get("pid") or 0, "state": "recovered", "kind": "process",
            "host_memory": 0, "since": note.get("when"), "snapshot": note.get("snapshot") or None,
            "name": f"{note['op']} died during {note.get('stage')}: {note['action']}",
            "recovery": note}
