"""Shared CLI state: where the store is, how to print, progress bars."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass

import click

VIA = "cli"             # "daemon" in gpusnapd's operations: --json objects say which ran them
EMIT_SINK = None        # gpusnapd's operations: called with each emitted object (metrics)


@dataclass
class AppContext:
    store: str
    key_file: str | None = None
    as_json: bool = False
    verbose: int = 0
    quiet: bool = False
    cache: str | None = None
    cache_size: str | None = None

    def repo(self, create: bool = True, store: str | None = None):
        from ..store import Repository
        repo = Repository.open(store or self.store, create=create, key_file=self.key_file,
                               cache=self.cache, cache_size=self.cache_size)
        if create:
            repo.require_writable()
        return repo

    def emit(self, data, text: str | None = None, *, err: bool = False) -> None:
        """JSON with --json, else the text form; on stdout, or stderr for a command whose
        stdout carries data (export -)."""
        if isinstance(data, dict):
            data = {**data, "via": VIA}
        if EMIT_SINK is not None:
            EMIT_SINK(data)
        if self.as_json:
            click.echo(json.dumps(data, indent=1, sort_keys=True, default=str), err=err)
        elif text is not None:
            click.echo(text, err=err)

    def note(self, text: str) -> None:
        if not self.quiet:
            click.echo(text, err=True)

    @contextlib.contextmanager
    def progress(self, desc: str, total: int | None = None):
        """A byte counter on stderr, only on a tty and without -q."""
        if self.quiet or self.as_json or not sys.stderr.isatty():
            yield None
            return
        from tqdm import tqdm
        # No monitor thread: ingest and materialise fork their workers only while this
        # process has no other thread (store/parallel.py), else they fall back to threads
        tqdm.monitor_interval = 0
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False,
                  file=sys.stderr) as bar:
            yield bar.update


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


STREAM_STEPS = (("w_zero", "finding zero pages"), ("w_cut", "cutting"),
                ("w_chunk", "hashing and compressing"), ("w_write", "writing"))
BESIDE = ("cuda_restore", "cuda_unlock", "sdk_resume")   # dump --leave-running: on a thread


def timings_table(timings: dict[str, float]) -> str:
    """The stages' wall seconds and their sum; a dump's page-stream figures (stream_*:
    the receiver's seconds inside criu_dump, the workers' summed seconds, their count)
    on lines of their own, in neither."""
    stages = {k: v for k, v in timings.items() if not k.startswith("stream_")}
    rows = [f"  {stage:<18} {secs:8.3f} s" for stage, secs in stages.items()]
    rows.append(f"  {'total':<18} {sum(stages.values()):8.3f} s")
    if "commit_sync" in stages and any(k in stages for k in BESIDE):
        rows.append("  (" + ", ".join(k for k in BESIDE if k in stages) + " ran at the same "
                    "time as pages_finish, ingest and commit_sync; the total adds both)")
    if "stream_recv" in timings:
        copiers = int(timings.get("stream_copiers", 0))
        rows.append(f"  page stream, inside criu_dump: reading {timings['stream_recv']:.3f} s"
                    + (f" ({copiers} copy threads; waiting for their last copies "
                       f"{timings.get('stream_copy_wait', 0.0):.3f} s)" if copiers else "")
                    + f", waiting for a free slot {timings.get('stream_slot_wait', 0.0):.3f} s"
                    + (f"; slots of 16 MiB: {int(timings['stream_slots'])} allowed, "
                       f"{int(timings.get('stream_slots_peak', 0))} used at most"
                       if "stream_slots" in timings else ""))
        steps = ((("w_read", "reading the private slots"),) if timings.get("stream_private") else ()) \
            + STREAM_STEPS
        rows.append(f"  {int(timings.get('stream_workers', 0))} workers, summed: "
                    + ", ".join(f"{what} {timings.get('stream_' + key, 0.0):.3f} s"
                                for key, what in steps))
        if "stream_end_s" in timings:
            rows.append(f"  new chunks: {timings['stream_new_gb_at_close']:.2f} GB stored by CRIU's end, "
                        f"{timings['stream_close_s']:.3f} s after the first slot; the last "
                        f"{timings['stream_end_s']:.3f} s after it")
    return "\n".join(rows)
