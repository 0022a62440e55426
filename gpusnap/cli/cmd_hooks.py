import click

from ..criu.hook_install import DEFAULT_CONFIG, DEFAULT_SCRIPT

_config = click.option("--config", default=DEFAULT_CONFIG, show_default=True,
                       help="CRIU config file the runtime passes to CRIU "
                            "(crun: /etc/criu/crun.conf; per container: the org.criu.config annotation).")
_script = click.option("--script", default=DEFAULT_SCRIPT, show_default=True,
                       help="Where the action script goes.")


@click.group("hooks")
def command():
    """CRIU action script for checkpoints that docker, podman, runc or crun drive.

    With it installed, `docker checkpoint create`, `podman container checkpoint/restore`
    and `runc checkpoint/restore` lock and checkpoint the CUDA processes of the container
    before CRIU dumps it, and restore and unlock them when it runs again.
    """


@command.command("install")
@_config
@_script
@click.pass_obj
def install(app, config, script):
    """Write the hook to --script and add it to --config (idempotent; FILE.bak kept)."""
    from ..criu.hook_install import install as do_install
    report = do_install(config=config, script=script)
    lines = [f"hook:   {report['script']}", f"config: {report['config']}"]
    if report["backup"]:
        lines.append(f"backup: {report['backup']}")
    lines.append("changed: " + (", ".join(report["changed"]) or "nothing (already installed)"))
    app.emit(report, "\n".join(lines))


@command.command("uninstall")
@_config
@_script
@click.option("--keep-script", is_flag=True, help="Only take the line out of --config.")
@click.pass_obj
def uninstall(app, config, script, keep_script):
    """Take the hook out of --config and delete --script."""
    from ..criu.hook_install import uninstall as do_uninstall
    report = do_uninstall(config=config, script=script, remove_script=not keep_script)
    text = "changed: " + (", ".join(report["changed"]) or "nothing (not installed)")
    if report["still_named_by"] and not keep_script:
        text += f"\nkept {script}: still named by {', '.join(report['still_named_by'])}"
    app.emit(report, text)
