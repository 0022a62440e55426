import click

MARK = {"ok": "ok     ", "warn": "warn   ", "missing": "missing"}


@click.command("doctor")
@click.pass_obj
def command(app):
    """Check CRIU, kernel features, privileges, the NVIDIA driver and container engines."""
    from ..engine.doctor import run_checks
    checks = run_checks()
    lines = []
    for c in checks:
        lines.append(f"{MARK[c.status]}  {c.name:<22} {c.detail}")
        if c.fix:
            lines.append(f"{'':9}  {'':<22} fix: {c.fix}")
    app.emit([c.to_dict() for c in checks], "\n".join(lines))
