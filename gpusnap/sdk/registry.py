"""Which tensors of a model can be dropped and read back from safetensors files.

A Slot is one tensor object (a Parameter or a buffer; tied names share one slot) whose
bytes are exactly one file range: same dtype, same shape, contiguous, owning its whole
storage (a view into a larger storage would free nothing when dropped, and reloading it
would break the sharing). Tensors with no entry in the files, or that fail those tests,
are left alone: they stay in GPU memory and go through the CUDA checkpoint as before.

Dropping keeps the tensor object (model code, optimisers and hooks that hold it keep
working) and swaps its storage: `t.data = torch.empty(0, dtype, device)`; reloading
swaps a new full-size storage in. Any *other* tensor that aliased the old storage (a
cached transpose, a CUDA graph's captured pointer) is not re-pointed: see the SDK's
docs on CUDA graphs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from dataclasses import dataclass, field

from .safetensors import Header, read_header

_TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
}


def torch_dtype(name: str):
    import torch
    return getattr(torch, _TORCH_DTYPES[name], None)


@dataclass
class Slot:
    name: str
    aliases: list[str]
    tensor: object              # the torch.Tensor / Parameter object, kept for good
    file: str
    offset: int
    length: int
    dtype: object
    shape: tuple
    device: object
    fingerprint: str | None = None


@dataclass
class ScratchSlot:
    name: str
    tensor: object
    dtype: object
    shape: tuple
    device: object

    @property
    def length(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.tensor.element_size()


@dataclass
class Registry:
    slots: list[Slot] = field(default_factory=list)
    scratch: list[ScratchSlot] = field(default_factory=list)
    headers: dict[str, Header] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)      # name -> why it is not registered

    @property
    def bytes(self) -> int:
        return sum(s.length for s in self.slots)

    @property
    def scratch_bytes(self) -> int:
        return sum(s.length for s in self.scratch)

    def devices(self) -> list:
        seen = []
        for s in [*self.slots, *self.scratch]:
            if s.device not in seen:
                seen.append(s.device)
        return seen


def expand_files(files) -> list[str]:
    """A path, a directory (its *.safetensors) or a list of those -> real paths."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out = []
    for f in files:
        f = os.fspath(f)
        if os.path.isdir(f):
            out += sorted(os.path.join(f, n) for n in os.listdir(f) if n.endswith(".safetensors"))
        else:
            out.append(f)
    if not out:
        raise ValueError("no safetensors files given")
    return [os.path.realpath(f) for f in out]


def named_tensors(model):
    """(name, tensor) of every parameter and buffer, tied names included; a mapping of
    name -> tensor is taken as it is."""
    if hasattr(model, "named_parameters"):
        yield from model.named_parameters(remove_duplicate=False)
        yield from model.named_buffers(remove_duplicate=False)
    else:
        yield from model.items()


def owns_storage(t) -> bool:
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def build(model, files, scratch=None, name_map=None, strict: bool = True) -> Registry:
    """strict: a tensor whose name is in the files but whose dtype or shape is not is an
    error (the model changed it after loading: a reload would be wrong); else kept."""
    reg = Registry()
    entries = {}
    for path in expand_files(files):
        h = read_header(path)
        reg.headers[path] = h
        for name, e in h.entries.items():
            if name in entries:
                raise ValueError(f"tensor {name!r} is in both {entries[name][0]} and {path}")
            entries[name] = (path, e)
    groups: dict[int, tuple[object, list[str]]] = {}
    for name, t in named_tensors(model):
        if t is None:
            continue
        groups.setdefault(id(t), (t, []))[1].append(name)
    problems = []
    for t, names in groups.values():
        keys = [(n, name_map(n) if name_map else n) for n in names]
        hit = next(((n, k) for n, k in keys if k in entries), None)
        if hit is None:
            reg.kept[names[0]] = "not in the safetensors files"
            continue
        name, key = hit
        path, e = entries[key]
        why = None
        if t.device.type == "meta":
            why = "on the meta device"
        elif torch_dtype(e.dtype) != t.dtype:
            why = f"dtype {t.dtype} in the model, {e.dtype} in the file"
        elif tuple(t.shape) != e.shape:
            why = f"shape {tuple(t.shape)} in the model, {list(e.shape)} in the file"
        elif not owns_storage(t):
            why = "shares its storage with other tensors (a view)"
        if why:
            reg.kept[name] = why
            if strict and "view" not in why:
                problems.append(f"{name}: {why}")
            continue
        reg.slots.append(Slot(name=name, aliases=[n for n in names if n != name], tensor=t,
                              file=path, offset=e.offset, length=e.length, dtype=t.dtype,
                              shape=tuple(t.shape), device=t.device))
    if problems:
        raise ValueError("these tensors do not match their safetensors entries, so they could "
                         "not be reloaded from them: " + "; ".join(problems[:10])
                         + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
    if scratch is not None:
        items = scratch.items() if isinstance(scratch, dict) else (
            (f"scratch.{i}", t) for i, t in enumerate(scratch))
        registered = {id(s.tensor) for s in reg.slots}
        for name, t in items:
            if id(t) in registered:
                raise ValueError(f"scratch tensor {name} is also a registered weight")
            if not owns_storage(t):
                raise ValueError(f"scratch tensor {name} shares its storage with other tensors")
            reg.scratch.append(ScratchSlot(name, t, t.dtype, tuple(t.shape), t.device))
    return reg


# ---- bytes of a tensor ------------------------------------------------------------

def byte_view(t):
    """The tensor's bytes as a flat uint8 tensor (no copy)."""
    import torch
    return t.detach().reshape(-1).view(torch.uint8)


def _buffer(ptr: int, n: int):
    return (ctypes.c_char * n).from_address(ptr)


def host_bytes(t) -> bytes:
    """A CPU copy of a (small) tensor's bytes."""
    b = byte_view(t).cpu()
    return ctypes.string_at(b.data_ptr(), b.numel()) if b.numel() else b""


def check_against_files(reg: Registry, sample: int = 4096) -> list[str]:
    """Compare the first and last `sample` bytes of every slot with its file range (one
    gather on the device, one copy to the host); the names that differ."""
    import torch
    if not reg.slots:
        return []
    by_device: dict[object, list[tuple[Slot, int, int]]] = {}
    for s in reg.slots:
        n = min(sample, s.length)
        by_device.setdefault(s.device, []).append((s, n, max(s.length - n, n)))
    bad = []
    for device, items in by_device.items():
        parts = []
        for s, n, tail in items:
            b = byte_view(s.tensor)
            parts += [b[:n], b[tail:]]
        got = host_bytes(torch.cat(parts)) if parts else b""
        pos = 0
        for s, n, tail in items:
            m = s.length - tail
            with open(s.file, "rb", buffering=0) as f:
                want = os.pread(f.fileno(), n, s.offset) + os.pread(f.fileno(), m, s.offset + tail)
            if got[pos:pos + n + m] != want:
                bad.append(s.name)
            pos += n + m
    return bad


BLOCK_WORDS = 1 << 16           # fingerprints sum 256 KiB blocks of int32 words


def fingerprints(tensors) -> list[str]:
    """One short hash per tensor, of its content, computed where the tensor lives (a
    few kernels per tensor and one copy to the host per device): the SHA-256 of the
    int64 sums of its 256 KiB blocks of int32 words (and of the bytes past the last
    whole word). Any changed word changes a sum; it is a check that a reload brought
    back the same bytes, not a defence against forgery."""
    import torch
    per_device: dict[object, list] = {}
    counts: dict[object, int] = {}
    spans = []                  # (device, index of first sum, count, nbytes)
    for t in tensors:
        b = byte_view(t)
        n = b.numel()
        if t.device.type == "cpu":
            # host memory: hash the bytes in place (torch's int64 sums would allocate
            # temporaries that stay in malloc's arenas and grow the checkpoint)
            spans.append((None, hashlib.sha256(
                _buffer(b.data_ptr(), n) if n else b"").hexdigest()[:32], 0, n))
            continue
        words = n // 4
        parts = []
        if words:
            w = b[: words * 4].view(torch.int32)
            full = words - words % BLOCK_WORDS
            if full:
                parts.append(w[:full].view(-1, BLOCK_WORDS).sum(dim=1, dtype=torch.int64))
            if words - full:
                parts.append(w[full:].sum(dtype=torch.int64).reshape(1))
        if n % 4:
            parts.append(b[words * 4:].sum(dtype=torch.int64).reshape(1))
        count = sum(int(p.numel()) for p in parts)
        per_device.setdefault(t.device, []).extend(parts)
        start = counts.get(t.device, 0)
        counts[t.device] = start + count
        spans.append((t.device, start, count, n))
    raw = {d: host_bytes(torch.cat(parts)) if parts else b"" for d, parts in per_device.items()}
    out = []
    for device, start, count, n in spans:
        if device is None:
            out.append(start)
            continue
        h = hashlib.sha256(n.to_bytes(8, "little"))
        h.update(raw[device][start * 8:(start + count) * 8])
        out.append(h.hexdigest()[:32])
    return out
