"""Where a seed cuts a model's weights file: each tensor's whole pages, from its first
byte, as the page stream cuts a run of pages (chunker.run_spans).

The first transparent dump of an LLM server writes its weights again, at the disk's
pace, though they already lie on the node in a safetensors file. The CUDA driver's host
copy of device memory puts a tensor's bytes on whole pages from the tensor's start where
the allocation is page-aligned; the chunker's cuts are content-defined within a run, so
such a tensor's chunks come out the same in the dump as here, except near its edges. The
GPU probe (benchmarks/results/seed_probe_h200_1b.md): for a 1.3B server, 51.8% of the
snapshot's non-zero image bytes were among a seed's chunks.

The file is untrusted: a header that is not a safetensors header, or offsets outside the
file, are refused (UsageError, exit 2) before anything is stored.
"""

from __future__ import annotations

import datetime as dt
import json
import mmap
import os
import struct

from ..errors import UsageError
from . import chunker

PAGE = chunker.PAGE
MAX_HEADER = 100 << 20      # safetensors' own bound on its JSON header


def tensor_ranges(path: str) -> list[tuple[int, int]]:
    """[start, end) byte offsets in the file of each tensor of a safetensors file, by
    start; empty tensors left out."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, "shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise _bad(path, f"its header length ({n} bytes) does not fit the file")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, ValueError):
        raise _bad(path, "its header is not JSON") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if type(header) is not dict:
        raise _bad(path, "its header is not a JSON object")
    base = 8 + n
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        offsets = meta.get("data_offsets") if type(meta) is dict else None
        if (type(offsets) is not list or len(offsets) != 2
                or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] or base + offsets[1] > size):
            raise _bad(path, f"tensor {str(name)[:80]!r} has no data_offsets inside the file")
        if offsets[1] > offsets[0]:
            out.append((base + offsets[0], base + offsets[1]))
    return sorted(out)


def spans(path: str) -> list[tuple[int, int]]:
    """(offset, length) in the file of every chunk a seed of it holds: each tensor's whole
    pages cut as a run of pages; the bytes past a tensor's last whole page are left out."""
    ranges = tensor_ranges(path)
    out: list[tuple[int, int]] = []
    if not ranges:
        return out
    with open(path, "rb") as f, \
            mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as mm, \
            memoryview(mm) as whole:
        for start, end in ranges:
            pages = (end - start) // PAGE
            if not pages:
                continue
            with whole[start:start + pages * PAGE] as run:
                out += [(start + off, n) for off, n in chunker.run_spans(run)]
    return out


_GIVE = "give a model's .safetensors files, or the directory holding them"


def weight_files(paths) -> list[str]:
    """The files of paths, a directory standing for its *.safetensors files (sorted);
    anything else but a regular file is refused."""
    out = []
    for path in paths:
        if not os.path.isdir(path):
            if not os.path.isfile(path):        # a FIFO would hold the header's read forever
                raise UsageError(f"{path} is not a regular file", hint=_GIVE)
            out.append(path)
            continue
        found = sorted(os.path.join(d, n) for d, _dirs, names in os.walk(path)
                       for n in names if n.endswith(".safetensors"))
        if not found:
            raise UsageError(f"{path} holds no .safetensors file", hint=_GIVE)
        out += found
    return out


def seeded_bytes(path: str) -> int:
    """What a seed of path holds (its record's file size): each tensor's whole pages, from
    the header alone."""
    return sum((end - start) // PAGE * PAGE for start, end in tensor_ranges(path))


def sources_of(paths: list[str], sources: list[str] | None = None) -> list[str]:
    """The names a seed's record keeps for paths: sources where given (`dump --seed auto`
    reads through descriptors, under the names the target gave), else their absolute paths."""
    return list(sources) if sources is not None else [os.path.abspath(p) for p in paths]


def already_seeded(seeds, paths: list[str], sources: list[str] | None = None):
    """The newest of seeds (Seed records) made from exactly these files as they are now:
    the same sources (the names records keep: the paths' absolute paths where not
    given), the same tensors' bytes each (from their headers), none
    modified since the second the seed was stamped in; else None. (A file rewritten with
    the same layout before its seed, in that second, is seeded again: the stamp is cut
    to the second.) Used to spare a dump's --seed the reading; what a seed lacks the
    dump writes anyway."""
    sources = sources_of(paths, sources)
    sizes = [seeded_bytes(p) for p in paths]
    newest = [os.stat(p).st_mtime for p in paths]
    for record in sorted(seeds, key=lambda s: s.created, reverse=True):
        if list(record.sources) != sources or [f.size for f in record.files] != sizes:
            continue
        try:
            made = dt.datetime.fromisoformat(record.created).timestamp()
        except ValueError:
            continue
        if max(newest) < made:
            return record
    return None


def _bad(path: str, why: str) -> UsageError:
    return UsageError(f"{path} is not a safetensors file: {why}",
                      hint="a seed is made from a model's .safetensors weight files")
