"""Shell completion (click's shell_complete): snapshot names and ids from the store,
container names from docker and podman. Completion never fails: no store, no engine,
no candidates."""

from __future__ import annotations

import shutil

import click
from click.shell_completion import CompletionItem


def _root_params(ctx: click.Context) -> dict:
    return ctx.find_root().params


def complete_snapshots(ctx: click.Context, param, incomplete: str) -> list[CompletionItem]:
    from ..store import Repository
    params = _root_params(ctx)
    try:
        store = params.get("store")
        if not store or not Repository.exists(store):
            return []
        repo = Repository.open(store, create=False, key_file=params.get("key_file"))
        words = {w for s in repo.list() for w in (s.name, s.id) if w}
    except Exception:  # noqa: BLE001 - a completion that cannot read the store offers nothing
        return []
    return [CompletionItem(w) for w in sorted(words) if w.startswith(incomplete)]


def complete_containers(ctx: click.Context, param, incomplete: str) -> list[CompletionItem]:
    from .. import sysrun
    names: set[str] = set()
    for engine in ("docker", "podman"):
        path = shutil.which(engine)
        if not path:
            continue
        try:
            res = sysrun.run([path, "ps", "--format", "{{.Names}}"], timeout=5)
        except Exception:  # noqa: BLE001 - a daemon that does not answer offers nothing
            continue
        if res.ok:
            names.update(res.stdout.split())
    return [CompletionItem(n) for n in sorted(names) if n.startswith(incomplete)]


def snapshot_argument(name: str = "snapshot", **kwargs):
    """A SNAPSHOT argument (an id, a unique id prefix or a name) that completes from the store."""
    return click.argument(name, shell_complete=complete_snapshots, **kwargs)
