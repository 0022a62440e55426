#!/usr/bin/env python3
"""Write the man pages from the CLI's own click metadata: gpusnap(1) and one page per
command, gpusnap-dump(1), gpusnap-key-generate(1), ... so they cannot drift from --help.

    python scripts/gen-man.py [OUTDIR]      (default: man/)

tests/unit/test_man.py regenerates them and fails when the checked-in pages differ.
"""

from __future__ import annotations

import os
import sys

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpusnap import VERSION, config  # noqa: E402
from gpusnap.cli import LazyGroup, cli  # noqa: E402
from gpusnap.errors import exit_code_table  # noqa: E402

FILES = [
    ("/etc/gpusnap/config.yaml", "Settings (YAML): store, key_file, workdir, threads, compress, "
     "engine, lock_timeout, socket; GPUSNAP_CONFIG names another file."),
    ("/var/lib/gpusnap", "The store: config, chunks/, snapshots/, seq, lock, tmp/, failed-logs/."),
    ("/run/gpusnap-work", "gpusnap's tmpfs with huge pages (0700, mounted as root by the first "
     "dump or restore) for CRIU images on their way in and out of the store, and warm caches."),
    ("/opt/gpusnap/criu", "The private CRIU that make setup installs where the host has none >= 4.1."),
]


def roff(text: str) -> str:
    """Plain text as roff: backslashes and dashes escaped, no line read as a request."""
    out = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        out.append("\\&" + line if line[:1] in (".", "'") else line)
    return "\n".join(out)


def _paragraphs(text: str) -> str:
    """click's help text (\\b marks a block kept as is) as roff paragraphs."""
    blocks = []
    for block in (text or "").strip().split("\n\n"):
        if block.startswith("\b\n"):
            blocks.append(".nf\n" + roff(block[2:]) + "\n.fi")
        else:
            blocks.append(roff(" ".join(line.strip() for line in block.splitlines())))
    return "\n.PP\n".join(blocks)


def _options(cmd: click.Command, ctx: click.Context) -> list[str]:
    lines = []
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record is None:
            continue
        names, help_ = record
        lines += [".TP", f"\\fB{roff(names)}\\fR", roff(help_ or "")]
    return lines


def page(path: list[str], cmd: click.Command) -> str:
    """The man page of the command at path (["gpusnap", "dump"])."""
    ctx = click.Context(cmd, info_name=" ".join(path), default_map={})
    title = "-".join(path)
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines = [f'.TH {title.upper()} 1 "" "gpusnap {VERSION}" "User Commands"',
             ".SH NAME", f"{roff(title)} \\- {roff(cmd.get_short_help_str(limit=200))}",
             ".SH SYNOPSIS", f"\\fB{roff(' '.join(path))}\\fR {roff(usage)}",
             ".SH DESCRIPTION", _paragraphs(cmd.help or ""),
             ".SH OPTIONS", *_options(cmd, ctx)]
    subs = _subcommands(cmd)
    if subs:
        lines.append(".SH COMMANDS")
        for name, sub in subs:
            short = LazyGroup.COMMANDS.get(name) if len(path) == 1 else None
            lines += [".TP", f"\\fB{roff(name)}\\fR", roff(short or sub.get_short_help_str(limit=200)),
                      f"See \\fB{roff('-'.join(path + [name]))}\\fR(1)."]
    if len(path) == 1:
        lines += [".SH ENVIRONMENT"]
        for s in config.SETTINGS:
            lines += [".TP", f"\\fB{s.env}\\fR", roff(f"{s.help} (config key {s.key})")]
        lines += [".TP", "\\fBGPUSNAP_CONFIG\\fR", "The config file (default /etc/gpusnap/config.yaml).",
                  ".PP", "README.md lists every variable gpusnap reads.",
                  ".SH EXIT STATUS", ".nf", roff(exit_code_table()), ".fi", ".SH FILES"]
        for name, text in FILES:
            lines += [".TP", f".I {name}", roff(text)]
    see = ["gpusnap"] if len(path) > 1 else []
    see += ["-".join(path + [name]) for name, _ in subs]
    lines += [".SH SEE ALSO", ",\n".join(f".BR {roff(s)} (1)" for s in see + ["criu"])]
    return "\n".join(lines) + "\n"


def _subcommands(cmd: click.Command) -> list[tuple[str, click.Command]]:
    if not isinstance(cmd, click.Group):
        return []
    ctx = click.Context(cmd, default_map={})
    return [(name, cmd.get_command(ctx, name)) for name in cmd.list_commands(ctx)]


def pages() -> dict[str, str]:
    """File name -> page, for gpusnap and every command and subcommand."""
    out = {}

    def walk(path, cmd):
        out["-".join(path) + ".1"] = page(path, cmd)
        for name, sub in _subcommands(cmd):
            walk(path + [name], sub)
    walk(["gpusnap"], cli)
    return out


def main(argv: list[str]) -> None:
    outdir = argv[0] if argv else os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "man")
    os.makedirs(outdir, exist_ok=True)
    for name, text in sorted(pages().items()):
        with open(os.path.join(outdir, name), "w") as f:
            f.write(text)
        print(os.path.join(outdir, name))


if __name__ == "__main__":
    main(sys.argv[1:])
