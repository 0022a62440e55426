"""The gpusnap command line: click only. Each command parses, calls the engine, renders."""

from __future__ import annotations

import os
import signal
import sys

import click

from .. import VERSION
from ..errors import GpusnapError, Interrupted, UsageError, exit_code_table
from .context import AppContext

DEFAULT_STORE = "/var/lib/gpusnap"


class LazyGroup(click.Group):
    """Commands are imported only when run, so `gpusnap --help` stays instant."""

    COMMANDS = {
        "dump": "Checkpoint a process tree or a container into the store.",
        "restore": "Restore a snapshot; prints the restored root pid (container: name id pid).",
        "suspend": "Park a process tree or container in place: its GPU memory to host memory.",
        "resume": "Bring a suspended target or a standby back onto a GPU (--gpu: another one).",
        "switch": "Give a GPU from one target to a parked one: suspend OUT, resume IN, all or nothing.",
        "ps": "List what gpusnap holds: suspended targets, standbys, restored trees.",
        "ls": "List snapshots.",
        "inspect": "Show everything recorded about a snapshot.",
        "verify": "Re-hash every chunk of one or all snapshots.",
        "warm": "Keep snapshots' images prepared on this host, so restores skip materialising them.",
        "rm": "Remove snapshots (their chunks go at the next gc).",
        "gc": "Delete chunks no snapshot or seed uses.",
        "forget": "Keep the newest N snapshots of each name, remove the rest, then gc.",
        "seed": "Store a model's weights ahead of its server's first dump (the dump writes the rest).",
        "export": "Write a snapshot and its chunks to one file.",
        "import": "Add a snapshot from a file made by export.",
        "copy": "Copy snapshots to another store (local or s3://), sending only missing chunks.",
        "key": "Make a key file for an encrypted store (--key-file).",
        "hooks": "Install the CRIU action script for docker/podman/runc checkpoints.",
        "doctor": "Check CRIU, the kernel, CUDA and container engines; say how to fix.",
        "demo": "Dump and restore a built-in workload and check its data.",
        "bench": "Cold start vs restore of an LLM server on this GPU (small by default).",
        "daemon": "Run gpusnapd: the JSON API on a unix socket (GPUSNAP_SOCKET makes the CLI use it).",
    }

    def make_context(self, info_name, args, parent=None, **extra):
        """The config file's settings become click's defaults (flag > env > config > default)."""
        conf = {}
        if parent is None and "default_map" not in extra:
            from .. import config
            conf = config.load()
            extra["default_map"] = config.default_map(conf)
            config.export_env(conf)
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta[CONFIG_META] = conf
        return ctx

    def list_commands(self, ctx):
        return list(self.COMMANDS)

    def get_command(self, ctx, name):
        if name not in self.COMMANDS:
            return None
        import importlib
        module = importlib.import_module(f"gpusnap.cli.cmd_{name}")
        return with_json_option(module.command)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, help_ in self.COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _json_flag(ctx, param, value):
    """--json, wherever it is given, switches the whole run to JSON output and errors."""
    if value:
        ctx.meta[JSON_META] = True
        app = ctx.find_object(AppContext)
        if app is not None:
            app.as_json = True
    return value


JSON_META = "gpusnap.json"
CONFIG_META = "gpusnap.config"
JSON_HELP = "Machine-readable output on stdout, errors included (before or after the command)."


def json_option() -> click.Option:
    """The one definition of --json; every command and the group get a copy of it."""
    return click.Option(["--json"], is_flag=True, expose_value=False, is_eager=True,
                        callback=_json_flag, help=JSON_HELP)


def with_json_option(command: click.Command) -> click.Command:
    """Give command (and a group's subcommands) --json, once."""
    if not any(p.name == "json" for p in command.params):
        command.params.append(json_option())
    for sub in getattr(command, "commands", {}).values():
        with_json_option(sub)
    return command


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
@click.option("-v", "--verbose", count=True, help="More detail on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes.")
@click.version_option(VERSION, prog_name="gpusnap")
@click.pass_context
def cli(ctx, store, cache, cache_size, key_file, verbose, quiet):
    """Checkpoint and restore GPU processes and containers.

    CUDA is locked and its device memory moved to the host by the driver's checkpoint
    API, CRIU (>= 4.1) dumps the process tree, and the images go to a content-addressed,
    zstd-compressed store shared by all snapshots. Restore rebuilds the images (every
    chunk verified), runs CRIU, then restores CUDA onto the same GPU or another of the
    same chip, and unlocks. Settings: flag > environment > /etc/gpusnap/config.yaml >
    default (`gpusnap doctor` shows them).
    """
    ctx.obj = AppContext(store=store, key_file=key_file, as_json=ctx.meta.get(JSON_META, False),
                         verbose=verbose, quiet=quiet, cache=cache, cache_size=cache_size)
    _recover(ctx.obj)


def _recover(app: AppContext) -> None:
    """Finish what a killed gpusnap (and its guard) left: one directory listing when
    there is nothing (engine/intent.py); `gpusnap ps` lists what was done."""
    from ..engine.intent import recover_stale
    for note in recover_stale():
        app.note(f"a {note['op']} by gpusnap {note['gpusnap']} died during its "
                 f"{note['stage']} stage: {note['action']}")


cli.params.insert(4, json_option())


def _sigterm(signum, frame):
    raise Interrupted("terminated by SIGTERM; every change to the target was undone")


def json_asked(args: list[str]) -> bool:
    return "--json" in args[:args.index("--")] if "--" in args else "--json" in args


def main(argv=None) -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    args = list(argv if argv is not None else sys.argv[1:])
    as_json = json_asked(args)
    try:                            # gpusnapd had its chance: gpusnap/entry.py
        cli.main(args=args, prog_name="gpusnap", standalone_mode=False)
    except GpusnapError as exc:
        fail(exc, as_json)
    except (KeyboardInterrupt, click.exceptions.Abort):    # Abort: click's Ctrl-C
        fail(Interrupted(), as_json)
    except click.ClickException as exc:
        fail(_from_click(exc), as_json)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a raw traceback
        fail(_unexpected(exc), as_json)


def _from_click(exc: click.ClickException) -> GpusnapError:
    """click's own errors (unknown option, missing argument, bad value) as gpusnap's."""
    hint = _usage_hint(exc)
    if isinstance(exc, click.NoSuchOption) and _group_option(exc.option_name) is not None:
        exc.possibilities = None        # not "did you mean" a command's option
    err = UsageError(exc.format_message(), hint=hint)
    if not isinstance(exc, click.UsageError):
        err.exit_code = exc.exit_code
    return err


def _usage_hint(exc: click.ClickException) -> str | None:
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return None
    name = getattr(exc, "option_name", None)
    own = _group_option(name) if isinstance(exc, click.NoSuchOption) and ctx.parent else None
    if own is not None:
        env = f", or set {own.envvar}" if isinstance(own.envvar, str) else ""
        root, _, rest = ctx.command_path.partition(" ")
        value = "" if own.is_flag or own.count else " VALUE"
        return (f"{name} is an option of gpusnap itself: give it before the command "
                f"(`{root} {name}{value} {rest} ...`){env}")
    return f"`{ctx.command_path} --help` lists what it takes"


def _group_option(name: str | None) -> click.Option | None:
    """The option of gpusnap itself (not of its commands) spelled name, if there is one."""
    for param in cli.params:
        if isinstance(param, click.Option) and name in param.opts + param.secondary_opts:
            return param
    return None


def _unexpected(exc: Exception) -> GpusnapError:
    """A failure no error class describes (a bug): its type and text, without a traceback."""
    err = GpusnapError(f"unexpected {type(exc).__name__}: {exc}",
                       hint="GPUSNAP_TRACEBACK=1 shows where; please report it")
    err.__cause__ = exc
    return err


def fail(exc: GpusnapError, as_json: bool) -> None:
    """Report exc (JSON on stdout with --json, text on stderr always) and exit with its code."""
    if as_json:
        import json
        click.echo(json.dumps(exc.to_dict()))
    click.echo(f"gpusnap: error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"  hint: {exc.hint}", err=True)
    if os.environ.get("GPUSNAP_TRACEBACK"):
        import traceback
        traceback.print_exception(exc.__cause__ or exc)
    sys.exit(exc.exit_code)
