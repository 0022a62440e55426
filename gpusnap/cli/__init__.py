"""The gpusnap command line: click only. Each command parses, calls the engine, renders."""

from __future__ import annotations

import os
import signal
import sys

import click

from .. import VERSION
from ..errors import GpusnapError, Interrupted, exit_code_table
from .context import AppContext

DEFAULT_STORE = "/var/lib/gpusnap"


class LazyGroup(click.Group):
    """Commands are imported only when run, so `gpusnap --help` stays instant."""

    COMMANDS = {
        "dump": "Checkpoint a process tree or a container into the store.",
        "restore": "Restore a snapshot; prints the restored root pid (container: name id pid).",
        "ls": "List snapshots.",
        "inspect": "Show everything recorded about a snapshot.",
        "verify": "Re-hash every chunk of one or all snapshots.",
        "warm": "Keep snapshots' images ready on this host, so restores skip materialising.",
        "rm": "Remove snapshots (their chunks go at the next gc).",
        "gc": "Delete chunks no snapshot uses.",
        "export": "Write a snapshot and its chunks to one file.",
        "import": "Add a snapshot from a file made by export.",
        "copy": "Copy snapshots to another store (local or s3://), sending only missing chunks.",
        "key": "Make a key file for an encrypted store (--key-file).",
        "hooks": "Install the CRIU action script for docker/podman/runc checkpoints.",
        "doctor": "Check CRIU, the kernel, CUDA and container engines; say how to fix.",
        "demo": "Dump and restore a built-in workload and check its data.",
        "bench": "Cold start vs restore of an LLM server on this GPU (small by default).",
    }

    def list_commands(self, ctx):
        return list(self.COMMANDS)

    def get_command(self, ctx, name):
        if name not in self.COMMANDS:
            return None
        import importlib
        module = importlib.import_module(f"gpusnap.cli.cmd_{name}")
        return module.command

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, help_ in self.COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


EPILOG = "Exit codes:\n\n\b\n" + exit_code_table()


@click.group(cls=LazyGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", envvar="GPUSNAP_STORE", default=DEFAULT_STORE, show_default=True,
              help="Snapshot store: a directory, or s3://BUCKET/PREFIX (env GPUSNAP_STORE).")
@click.option("--cache", envvar="GPUSNAP_CACHE", default=None, type=click.Path(file_okay=False),
              help="Local chunk cache of an s3:// store (env GPUSNAP_CACHE; default /var/cache/gpusnap).")
@click.option("--cache-size", envvar="GPUSNAP_CACHE_SIZE", default=None,
              help="Bound of that cache, e.g. 20G (the default); least recently used chunks go first.")
@click.option("--key-file", envvar="GPUSNAP_KEY_FILE", type=click.Path(dir_okay=False),
              help="Key of an encrypted store; a new store is created encrypted with it "
                   "(env GPUSNAP_KEY_FILE; make one with `gpusnap key generate`).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("-v", "--verbose", count=True, help="More detail on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes.")
@click.version_option(VERSION, prog_name="gpusnap")
@click.pass_context
def cli(ctx, store, cache, cache_size, key_file, as_json, verbose, quiet):
    """gpusnap: checkpoint and restore GPU processes and containers, fast."""
    ctx.obj = AppContext(store=store, key_file=key_file, as_json=as_json, verbose=verbose,
                         quiet=quiet, cache=cache, cache_size=cache_size)


def _sigterm(signum, frame):
    raise Interrupted("terminated by SIGTERM; every change to the target was undone")


def main(argv=None) -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    as_json = "--json" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="gpusnap", standalone_mode=False)
    except GpusnapError as exc:
        _report(exc, as_json)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        exc = Interrupted()
        _report(exc, as_json)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:      # click's form of a KeyboardInterrupt
        exc = Interrupted()
        _report(exc, as_json)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if isinstance(exc, click.UsageError) else 1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def _report(exc: GpusnapError, as_json: bool) -> None:
    if as_json:
        import json
        click.echo(json.dumps(exc.to_dict()))
    click.echo(f"gpusnap: error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"  hint: {exc.hint}", err=True)
    if os.environ.get("GPUSNAP_TRACEBACK"):
        import traceback
        traceback.print_exc()
