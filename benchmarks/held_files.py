"""The sdk read probe's `held` row: weight files held for a resume, each file mmap'd read-only and the whole mapping
registered with CUDA (cudaHostRegister, read-only and portable) once, so the page
cache's own pages stay pinned, and a resume copies every tensor straight from them to
the GPU by DMA: no read into a bounce buffer, no second copy in host memory.

Measured (host_park_probe_h200.md, H200, 17 GB in 247 tensors, page cache warm):
registering the whole file took 0.41-0.51 s and giving it back 0.14 s; the copies from it
ran at 54.8 GB/s (the pinned host-to-device floor, 55.3) against 26-27 GB/s for the
pinned reader (loader.py), whose read from the page cache into its pool is the bound.
Registering windows per load instead (loader's `mapped` reader) pays the registration
inside every load: 21-24 GB/s.

The cost is host memory: while held, the files' pages are resident and cannot be
reclaimed (they are the page cache's, so no more than a warm page cache holds, but pinned).
Registration faults in whatever is not cached, from disk at its speed. A file changed
in place while held changes what a resume copies.

Not in gpusnap's SDK: held through a park, the registration costs the driver's restore
about what registering cost (it pins the pages again), so a resume is no faster
(sdk_read_probe_h200_s19_held.md).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
import warnings

from gpusnap.sdk.loader import PAGE, READ_ONLY, Job, read_only_register_supported
from gpusnap.sdk.registry import byte_view

PORTABLE = 1                        # cudaHostRegisterPortable


class _File:
    def __init__(self, path: str):
        import torch
        self.path = path
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            if not self.size:
                raise RuntimeError(f"{path} is empty")
            self.map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        with warnings.catch_warnings():     # read-only: torch warns, nothing writes to it
            warnings.simplefilter("ignore")
            self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.ptr = self.bytes.data_ptr()
        self.registered = 0

    def register(self) -> None:
        import torch
        n = -(-self.size // PAGE) * PAGE    # the mapping's whole pages
        err = torch.cuda.cudart().cudaHostRegister(self.ptr, n, READ_ONLY | PORTABLE)
        if int(getattr(err, "value", err)) != 0:
            raise RuntimeError(f"cudaHostRegister (read-only) of {self.path}: {err}")
        self.registered = n

    def close(self) -> None:
        import torch
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.ptr)
            self.registered = 0
        self.bytes = None
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()


class HeldFiles:
    """The weight files held registered: hold(), load() while held, release()."""

    def __init__(self):
        self._files: dict[str, _File] = {}

    def hold(self, paths) -> dict:
        """Register every path not yet held. All or nothing: on failure what this call
        registered is given back."""
        t = time.perf_counter()
        if not read_only_register_supported():
            raise RuntimeError("this GPU cannot register host memory read-only "
                               "(READ_ONLY_HOST_REGISTER_SUPPORTED is 0)")
        new: list[_File] = []
        try:
            for p in sorted({os.path.realpath(p) for p in paths} - set(self._files)):
                new.append(_File(p))
                new[-1].register()
        except BaseException:
            for f in new:
                f.close()
            raise
        self._files.update((f.path, f) for f in new)
        return {"files": len(new), "bytes": sum(f.registered for f in new),
                "seconds": round(time.perf_counter() - t, 4)}

    def load(self, jobs: list[Job], streams: int = 1) -> dict:
        """Copy every job's range from its held file into its tensor, on `streams`
        streams per device (one reaches the link's speed: host_park_probe_h200.md)."""
        import torch
        t = time.perf_counter()
        per_device: dict = {}
        for i, j in enumerate(jobs):
            dst = byte_view(j.dst)
            if dst.numel() != j.length:
                raise ValueError(f"{j.path}@{j.offset}: {j.length} bytes into a tensor of {dst.numel()}")
            f = self._files[os.path.realpath(j.path)]
            ss = per_device.get(j.dst.device)
            if ss is None:
                ss = per_device[j.dst.device] = [torch.cuda.Stream(device=j.dst.device)
                                                 for _ in range(streams)]
            with torch.cuda.stream(ss[i % streams]):
                dst.copy_(f.bytes[j.offset:j.offset + j.length], non_blocking=True)
        for ss in per_device.values():
            for s in ss:
                s.synchronize()
        return {"reader": "held", "bytes": sum(j.length for j in jobs),
                "seconds": time.perf_counter() - t, "threads": 1, "chunk": None}

    def release(self) -> float:
        """Unregister and unmap everything held; returns the seconds it took."""
        t = time.perf_counter()
        files, self._files = self._files, {}
        for f in files.values():
            f.close()
        return time.perf_counter() - t
