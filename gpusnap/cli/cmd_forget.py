import click

from .cmd_gc import freed_text, prune


@click.command("forget")
@click.option("--keep-last", type=click.IntRange(min=1), required=True, metavar="N",
              help="Keep the N newest snapshots of each name (the unnamed ones count as one name).")
@click.option("--name", help="Only snapshots of this name.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed and freed, change nothing.")
@click.pass_obj
def command(app, keep_last, name, dry_run):
    """Remove all but the newest --keep-last snapshots of each name, then gc.

    Newest is by the store's commit sequence. Like `restic forget --prune`: the removed
    snapshots' chunks that no other snapshot uses are deleted at once.
    """
    repo = app.repo(create=False)
    with repo.exclusive_lock():
        plan = repo.forget_plan(keep_last, name)
        report = prune(repo, dry_run, plan["forget"])
    verb = "would remove" if dry_run else "removed"
    app.emit({**plan, "gc": report},
             "\n".join([f"{verb} {sid}" for sid in plan["forget"]]
                       + [f"kept {len(plan['keep'])}; {freed_text(report)}"]))
