"""Read file ranges into tensors, as fast as this host allows.

Three readers, chosen per call (gds_backend() says which one a GPU load uses, and why):

kvikio    cuFile through KvikIO: with the nvidia-fs kernel module loaded (and a
          filesystem it supports) the NVMe DMAs straight into GPU memory (GPUDirect
          Storage); without it, KvikIO's compatibility mode (POSIX reads through its own
          bounce buffers and thread pool).
pinned    no KvikIO: the ranges are cut into windows of `chunk` bytes (adjacent tensors
          share windows, so small tensors cost no extra reads); `threads` workers each
          own two pinned host buffers and a CUDA stream, pread(2) a window into one buffer
          while the previous window's host-to-device copy runs from the other
          (double-buffered), and wait on a buffer's event before reusing it.
cpu       tensors in host memory: parallel pread(2) straight into the tensor.

Pinned buffers are taken from PyTorch's caching host allocator and its cache is emptied
afterwards: nothing pinned is left for a later checkpoint to copy.

Environment: GPUSNAP_SDK_READER=pinned|kvikio forces a reader; GPUSNAP_SDK_THREADS and
GPUSNAP_SDK_CHUNK_MB set the pinned reader's workers and window size.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .registry import byte_view

DEFAULT_THREADS = 8
DEFAULT_CHUNK = 16 << 20
GAP = 64 << 10                  # ranges this close are read in one window


@dataclass
class Job:
    path: str
    offset: int
    length: int
    dst: object                 # a torch.Tensor of exactly `length` bytes


def gds_backend() -> dict:
    """{'reader': 'kvikio' | 'kvikio-compat' | 'pinned', 'reason': ...} for loads into
    GPU memory on this host. Looks, does not import: KvikIO (and cuFile behind it) is
    loaded only by the first load that uses it, so a server that was never resumed
    carries none of it into its checkpoint."""
    import importlib.util
    forced = os.environ.get("GPUSNAP_SDK_READER")
    if forced == "pinned":
        return {"reader": "pinned", "reason": "GPUSNAP_SDK_READER=pinned"}
    try:
        found = importlib.util.find_spec("kvikio") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return {"reader": "pinned", "reason": "kvikio is not importable: parallel POSIX reads "
                "into pinned host buffers and asynchronous copies to the GPU"}
    if not os.path.exists("/proc/driver/nvidia-fs"):
        return {"reader": "kvikio-compat",
                "reason": "kvikio is importable but the nvidia-fs kernel module is not loaded: "
                          "cuFile's compatibility mode (POSIX reads through bounce buffers)"}
    return {"reader": "kvikio", "reason": "kvikio with nvidia-fs loaded: GPUDirect Storage DMA "
                                          "from storage into GPU memory (KvikIO falls back to "
                                          "its compatibility mode for files GDS cannot serve)"}


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ[name]))
    except (KeyError, ValueError):
        return default


def load(jobs: list[Job], reader: str | None = None, threads: int | None = None,
         chunk: int | None = None) -> dict:
    """Fill every job's tensor from its file range. Returns {reader, bytes, seconds}."""
    threads = threads or _env_int("GPUSNAP_SDK_THREADS", DEFAULT_THREADS)
    chunk = chunk or (_env_int("GPUSNAP_SDK_CHUNK_MB", DEFAULT_CHUNK >> 20) << 20)
    for j in jobs:
        if byte_view(j.dst).numel() != j.length:
            raise ValueError(f"{j.path}@{j.offset}: {j.length} bytes into a tensor of "
                             f"{byte_view(j.dst).numel()}")
    start = time.perf_counter()
    host = [j for j in jobs if j.dst.device.type == "cpu"]
    dev = [j for j in jobs if j.dst.device.type != "cpu"]
    used = []
    if host:
        _load_cpu(host, threads, chunk)
        used.append("cpu")
    if dev:
        reader = reader or gds_backend()["reader"]
        if reader.startswith("kvikio"):
            try:
                _load_kvikio(dev, threads, chunk)
            except Exception as e:  # noqa: BLE001 - the pinned reader does the same job
                reader = f"pinned (kvikio failed: {type(e).__name__}: {e})"
                _load_pinned(dev, threads, chunk)
        else:
            _load_pinned(dev, threads, chunk)
        used.append(reader)
    total = sum(j.length for j in jobs)
    return {"reader": "+".join(used) or "none", "bytes": total,
            "seconds": time.perf_counter() - start, "threads": threads, "chunk": chunk}


def _pread_into(fd: int, buf, offset: int) -> None:
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"file ends before byte {offset + len(view)}")
        done += n


def _address_buffer(ptr: int, n: int):
    return (ctypes.c_char * n).from_address(ptr)


@dataclass
class _Window:
    path: str
    offset: int
    length: int
    pieces: list                # (dst uint8 view, dst offset, offset in window, n)


def windows(jobs: list[Job], chunk: int) -> list[_Window]:
    """Cut the jobs' file ranges into read windows of at most `chunk` bytes; ranges of
    one file that follow each other (gaps under GAP) share windows."""
    out = []
    by_file: dict[str, list[Job]] = {}
    for j in jobs:
        if j.length:
            by_file.setdefault(j.path, []).append(j)
    for path, js in by_file.items():
        js.sort(key=lambda j: j.offset)
        cur = None
        for j in js:
            dst = byte_view(j.dst)
            pos = 0
            while pos < j.length:
                at = j.offset + pos
                if cur is None or at < cur.offset + cur.length or at - (cur.offset + cur.length) > GAP \
                        or at >= cur.offset + chunk:
                    cur = _Window(path, at, 0, [])
                    out.append(cur)
                n = min(j.length - pos, cur.offset + chunk - at)
                cur.pieces.append((dst, pos, at - cur.offset, n))
                cur.length = at + n - cur.offset
                pos += n
    return out


def _load_cpu(jobs: list[Job], threads: int, chunk: int) -> None:
    fds = {}
    try:
        for j in jobs:
            if j.path not in fds:
                fds[j.path] = os.open(j.path, os.O_RDONLY)
        work = []
        for j in jobs:
            base = byte_view(j.dst).data_ptr()
            for a in range(0, j.length, chunk):
                work.append((fds[j.path], base + a, min(chunk, j.length - a), j.offset + a))
        with ThreadPoolExecutor(min(threads, max(1, len(work)))) as ex:
            list(ex.map(lambda w: _pread_into(w[0], _address_buffer(w[1], w[2]), w[3]), work))
    finally:
        for fd in fds.values():
            os.close(fd)


def _load_pinned(jobs: list[Job], threads: int, chunk: int) -> None:
    import torch
    wins = windows(jobs, chunk)
    if not wins:
        return
    size = max(w.length for w in wins)
    q: queue.SimpleQueue = queue.SimpleQueue()
    for w in wins:
        q.put(w)
    fds = {}
    errors = []
    for w in wins:
        if w.path not in fds:
            fds[w.path] = os.open(w.path, os.O_RDONLY)

    def worker():
        bufs: list = []
        events: list = [None, None]
        streams: dict = {}
        k = 0
        try:
            bufs += [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            raw = [_address_buffer(b.data_ptr(), size) for b in bufs]
            while not errors:
                try:
                    w = q.get_nowait()
                except queue.Empty:
                    break
                if events[k] is not None:
                    events[k].synchronize()
                _pread_into(fds[w.path], memoryview(raw[k])[:w.length], w.offset)
                device = w.pieces[0][0].device
                stream = streams.get(device)
                if stream is None:
                    stream = streams[device] = torch.cuda.Stream(device=device)
                with torch.cuda.stream(stream):
                    for dst, doff, boff, n in w.pieces:
                        dst[doff:doff + n].copy_(bufs[k][boff:boff + n], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                events[k] = ev
                k ^= 1
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            errors.append(e)
        finally:
            for ev in events:
                if ev is not None:
                    ev.synchronize()
            bufs.clear()

    try:
        ts = [threading.Thread(target=worker, name=f"gpusnap-sdk-read-{i}", daemon=True)
              for i in range(min(threads, len(wins)))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        for fd in fds.values():
            os.close(fd)
        empty = getattr(torch._C, "_host_emptyCache", None)
        if empty is not None:
            empty()
    if errors:
        raise errors[0]


def _load_kvikio(jobs: list[Job], threads: int, chunk: int) -> None:
    """One pread per tensor; KvikIO cuts each into task_size pieces over its thread pool
    (whose default size is 1: set here from `threads` unless KVIKIO_NTHREADS is set)."""
    import kvikio
    import kvikio.defaults
    settings = {"task_size": chunk}
    if not os.environ.get("KVIKIO_NTHREADS"):
        settings["num_threads"] = threads
    try:
        kvikio.defaults.set(settings)
    except Exception:  # noqa: BLE001 - older KvikIO: its defaults then
        pass
    handles = {}
    try:
        futures = []
        for j in jobs:
            if j.path not in handles:
                handles[j.path] = kvikio.CuFile(j.path, "r")
            futures.append((j, handles[j.path].pread(byte_view(j.dst), j.length, j.offset)))
        for j, fut in futures:
            got = fut.get()
            if got != j.length:
                raise EOFError(f"{j.path}: read {got} of {j.length} bytes at {j.offset}")
    finally:
        for h in handles.values():
            h.close()
