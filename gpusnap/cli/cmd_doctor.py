import click

MARK = {"ok": "ok     ", "warn": "warn   ", "missing": "missing"}


def _settings(ctx: click.Context) -> list[dict]:
    """Each setting's value and where it came from (flag > env > config > default)."""
    from click.core import ParameterSource

    from .. import config
    from . import CONFIG_META
    root = ctx.find_root()
    flags = {key: root.params[key] for key in ("store", "key_file")
             if root.get_parameter_source(key) == ParameterSource.COMMANDLINE}
    return config.effective(root.meta.get(CONFIG_META, {}), flags)


@click.command("doctor")
@click.pass_context
def command(ctx):
    """Check CRIU, kernel features, privileges, the NVIDIA driver, container engines and
    how the store makes chunks durable (its filesystem), and show each setting with its
    source (flag > env > config file > default).

    Changes nothing on the host.
    """
    from ..engine.doctor import Check, run_checks, store_writes
    checks = run_checks() + [store_writes(ctx.obj.store)]
    checks += [Check(f"setting {row['setting']}", "ok", f"{row['value']} ({row['source']})")
               for row in _settings(ctx)]
    lines = []
    for c in checks:
        lines.append(f"{MARK[c.status]}  {c.name:<22} {c.detail}")
        if c.fix:
            lines.append(f"{'':9}  {'':<22} fix: {c.fix}")
    ctx.obj.emit([c.to_dict() for c in checks], "\n".join(lines))
