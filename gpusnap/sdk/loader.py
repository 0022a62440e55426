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
mapped    no host copy (an experiment, GPUSNAP_SDK_READER=mapped): each file mmap'd
          read-only; page-aligned windows of it cudaHostRegister'ed with
          cudaHostRegisterReadOnly (the page cache's own pages pinned where they are),
          copied to the GPU by DMA on `threads` workers' streams, unregistered once
          copied. Needs the device's READ_ONLY_HOST_REGISTER_SUPPORTED; where a
          registration fails the load is done again by the pinned reader. Slower
          than pinned on an H200 (22-24 against 25-28 GB/s, 17 GB,
          sdk_read_probe_h200_s18.md): pinning page-cache pages costs more than the
          copy it saves.
cpu       tensors in host memory: parallel pread(2) straight into the tensor.

The pinned buffers are one block taken for the load and given back after it: nothing
pinned is left for a later checkpoint to copy (_PinnedPool).

Defaults, from benchmarks/results/gds_h200.md (H200, 16 CPUs, weights in the page
cache): pinned, 8 threads, the pool registered (mmap + huge pages + cudaHostRegister);
4 MiB windows below 8 GiB (1.7 GB: 14.4 GB/s for one load in a fresh process against
11.0 with torch's pinning), 16 MiB from 8 GiB up (16 GB: 35.0 GB/s against 25.2 with
the old default, torch x 4 MiB); 16 threads from 8 GiB up (sdk_read_probe_h200_s18{,_halves}.md:
17 GB, 27.4-28.2 GB/s against 23.2-25.5 with 8, the read from the page cache into the
pinned pool being the bound: 27.5 GB/s alone, the copies to the GPU alone 43.7). KvikIO 8 threads x 16
MiB tasks (its compatibility mode read 6.6-8.8 GB/s inside the restored server; 24-34
GB/s once its bounce buffers exist). From disk (drop_caches) every reader gave the
disk's ~1.6-2 GB/s.

Environment: GPUSNAP_SDK_READER=pinned|kvikio|mapped forces a reader; GPUSNAP_SDK_THREADS and
GPUSNAP_SDK_CHUNK_MB set the workers and the window (task) size; GPUSNAP_SDK_PIN how the
pinned reader pins (torch | register).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .registry import byte_view

DEFAULT_THREADS = 8
DEFAULT_CHUNK = {"pinned": 4 << 20, "kvikio": 16 << 20}
BIG_LOAD, BIG_WINDOW = 8 << 30, 16 << 20        # a load this large: pinned windows this large
BIG_THREADS = 16                                # ... and this many pinned workers
GAP = 64 << 10                  # ranges this close are read in one window
MAPPED_WINDOW = 256 << 20       # the mapped reader's registration unit
PAGE = 4096
READ_ONLY = 8                   # cudaHostRegisterReadOnly
ATTR_READ_ONLY_REGISTER = 113   # CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED


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
    if forced == "kvikio":
        return {"reader": "kvikio", "reason": "GPUSNAP_SDK_READER=kvikio"}
    if forced == "mapped":
        return {"reader": "mapped", "reason": "GPUSNAP_SDK_READER=mapped"}
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
    asked = threads or (_env_int("GPUSNAP_SDK_THREADS", DEFAULT_THREADS)
                        if os.environ.get("GPUSNAP_SDK_THREADS") else None)
    threads = asked or DEFAULT_THREADS
    if not chunk and os.environ.get("GPUSNAP_SDK_CHUNK_MB"):
        chunk = _env_int("GPUSNAP_SDK_CHUNK_MB", 4) << 20
    for j in jobs:
        if byte_view(j.dst).numel() != j.length:
            raise ValueError(f"{j.path}@{j.offset}: {j.length} bytes into a tensor of "
                             f"{byte_view(j.dst).numel()}")
    start = time.perf_counter()
    host = [j for j in jobs if j.dst.device.type == "cpu"]
    dev = [j for j in jobs if j.dst.device.type != "cpu"]
    used = []
    if host:
        _load_cpu(host, threads, chunk or (16 << 20))
        used.append("cpu")
    if dev:
        reader = reader or gds_backend()["reader"]
        if reader.startswith("kvikio"):
            chunk = chunk or DEFAULT_CHUNK["kvikio"]
            try:
                _load_kvikio(dev, threads, chunk)
            except Exception as e:  # noqa: BLE001 - the pinned reader does the same job
                reader = f"pinned (kvikio failed: {type(e).__name__}: {e})"
                _load_pinned(dev, threads, DEFAULT_CHUNK["pinned"])
        elif reader == "mapped":
            chunk = chunk or MAPPED_WINDOW
            try:
                _load_mapped(dev, threads, chunk)
            except Exception as e:  # noqa: BLE001 - the pinned reader does the same job
                reader = f"pinned (mapped failed: {type(e).__name__}: {e})"
                chunk = pinned_window(sum(j.length for j in dev))
                _load_pinned(dev, threads, chunk)
        else:
            nbytes = sum(j.length for j in dev)
            chunk = chunk or pinned_window(nbytes)
            threads = asked or pinned_threads(nbytes)
            _load_pinned(dev, threads, chunk)
        used.append(reader)
    total = sum(j.length for j in jobs)
    return {"reader": "+".join(used) or "none", "bytes": total,
            "seconds": time.perf_counter() - start, "threads": threads, "chunk": chunk}


def pinned_threads(nbytes: int) -> int:
    """The pinned reader's workers for a load of nbytes: BIG_THREADS from BIG_LOAD up
    (sdk_read_probe_h200_s18{,_halves}.md, 17 GB in 16 MiB windows, two calls: 16 threads 27.4 and
    28.2 GB/s against 25.5 and 23.2 with 8; 4 or 32: 15-16). Pure."""
    return BIG_THREADS if nbytes >= BIG_LOAD else DEFAULT_THREADS


def pinned_window(nbytes: int) -> int:
    """The pinned reader's window for a load of nbytes: larger windows pay for their
    larger pinned pool only on large loads (module docstring). Pure."""
    return BIG_WINDOW if nbytes >= BIG_LOAD else DEFAULT_CHUNK["pinned"]


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


HUGE = 2 << 20


class _PinnedPool:
    """One block of page-locked host memory for all the workers' buffers, taken for one
    load and given back after it (nothing pinned stays for a checkpoint to copy).

    Pinning can cost more than the copies (gds_h200.md: 16 workers x 2 x 64 MiB pinned
    per load took a 1.7 GB load from 9.7 to 1.5 GB/s), so the pool is small (workers x 2
    x window) and taken once. mode "register" (the default) maps anonymous memory with
    transparent huge pages asked for (madvise) and cudaHostRegister()s it: faster than
    "torch", torch.empty(pin_memory=True) (one load: 14.4 against 11.0 GB/s for 1.7 GB,
    30.0 against 25.2 for 16 GB). GPUSNAP_SDK_PIN chooses; register falls back to torch
    when it fails."""

    def __init__(self, nbytes: int, mode: str | None = None):
        import torch
        self.mode = mode or os.environ.get("GPUSNAP_SDK_PIN", "register")
        self._map = None
        self._registered = 0
        if self.mode == "register":
            try:
                self._register(nbytes)
                return
            except Exception:  # noqa: BLE001 - the other way works everywhere
                self.close()
                self.mode = "torch"
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _register(self, nbytes: int) -> None:
        import mmap

        import torch
        self._map = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(AttributeError, OSError):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(self._map, dtype=torch.uint8)
        skip = -whole.data_ptr() % HUGE
        self.tensor = whole[skip:skip + nbytes]
        del whole
        err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
        if int(getattr(err, "value", err)) != 0:
            raise RuntimeError(f"cudaHostRegister: {err}")
        self._registered = self.tensor.data_ptr()

    def close(self) -> None:
        import torch
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = 0
        self.tensor = None
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self.mode == "torch":
            empty = getattr(torch._C, "_host_emptyCache", None)
            if empty is not None:
                empty()


def _load_pinned(jobs: list[Job], threads: int, chunk: int) -> None:
    wins = windows(jobs, chunk)
    if not wins:
        return
    size = max(w.length for w in wins)
    workers = min(threads, len(wins))
    q: queue.SimpleQueue = queue.SimpleQueue()
    for w in wins:
        q.put(w)
    fds = {}
    errors: list[BaseException] = []
    for w in wins:
        if w.path not in fds:
            fds[w.path] = os.open(w.path, os.O_RDONLY)
    pool = _PinnedPool(workers * 2 * size)
    try:
        ts = [threading.Thread(target=_pinned_worker, args=(pool, i, size, q, fds, errors),
                               name=f"gpusnap-sdk-read-{i}", daemon=True)
              for i in range(workers)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        for fd in fds.values():
            os.close(fd)
        pool.close()
    if errors:
        raise errors[0]


def _pinned_worker(pool: _PinnedPool, i: int, size: int, q: queue.SimpleQueue,
                   fds: dict[str, int], errors: list[BaseException]) -> None:
    """Reader thread i: windows from q into its two pinned buffers in turn, each copied to
    its GPU on the thread's stream while the other one fills. Stops at the first error
    of any thread (kept in errors)."""
    import torch
    bufs = [pool.tensor[(2 * i + j) * size:(2 * i + j + 1) * size] for j in range(2)]
    raw = [_address_buffer(b.data_ptr(), size) for b in bufs]
    events: list = [None, None]
    streams: dict = {}
    k = 0
    try:
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


def read_only_register_supported(device: int = 0) -> bool:
    """The device can map host memory read-only (cudaHostRegisterReadOnly): what the
    mapped reader needs to pin page-cache pages that are not writable."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev, v = ctypes.c_int(0), ctypes.c_int(0)
        if cuda.cuDeviceGet(ctypes.byref(dev), device):
            return False
        return cuda.cuDeviceGetAttribute(ctypes.byref(v), ATTR_READ_ONLY_REGISTER, dev) == 0 and bool(v.value)
    except OSError:
        return False


def mapped_windows(jobs: list[Job], window: int) -> dict[str, dict[int, list]]:
    """{path: {window index: [(dst uint8 view, dst offset, file offset, n)]}}: each job's
    range cut where the file's aligned windows of `window` bytes (a multiple of the page
    size) end, so that two windows never share a page and register apart. Pure."""
    if window % PAGE:
        raise ValueError(f"window {window} is not a multiple of {PAGE}")
    out: dict[str, dict[int, list]] = {}
    for j in jobs:
        dst = byte_view(j.dst)
        pos = 0
        while pos < j.length:
            at = j.offset + pos
            w = at // window
            n = min(j.length - pos, (w + 1) * window - at)
            out.setdefault(j.path, {}).setdefault(w, []).append((dst, pos, at, n))
            pos += n
    return out


def _load_mapped(jobs: list[Job], threads: int, window: int) -> None:
    import mmap
    import warnings

    import torch
    cut = mapped_windows(jobs, window)
    maps, whole, todo = {}, {}, []
    try:
        for path, wins in cut.items():
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                maps[path] = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            with warnings.catch_warnings():     # read-only: torch warns, nothing writes to it
                warnings.simplefilter("ignore")
                whole[path] = torch.frombuffer(maps[path], dtype=torch.uint8)
            for w in sorted(wins):
                end = min((w + 1) * window, -(-size // PAGE) * PAGE)
                todo.append((path, w * window, end - w * window, wins[w]))
        q: queue.SimpleQueue = queue.SimpleQueue()
        for t in todo:
            q.put(t)
        errors: list[BaseException] = []
        ts = [threading.Thread(target=_mapped_worker, args=(whole, q, errors),
                               name=f"gpusnap-sdk-map-{i}", daemon=True)
              for i in range(min(threads, len(todo)))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]
    finally:
        whole.clear()
        for m in maps.values():
            with contextlib.suppress(BufferError):
                m.close()


def _mapped_worker(whole: dict, q: queue.SimpleQueue, errors: list[BaseException]) -> None:
    """Windows from q: register, copy on this thread's stream, unregister the previous
    window once its copies are done (so one window's DMA overlaps the next one's
    registration). Stops at the first error of any thread."""
    import torch
    rt = torch.cuda.cudart()
    prev = None
    streams: dict = {}
    try:
        while not errors:
            try:
                path, start, n, pieces = q.get_nowait()
            except queue.Empty:
                break
            ptr = whole[path].data_ptr() + start
            err = rt.cudaHostRegister(ptr, n, READ_ONLY)
            if int(getattr(err, "value", err)) != 0:
                raise RuntimeError(f"cudaHostRegister (read-only) of {n} bytes of {path}: {err}")
            try:
                device = pieces[0][0].device
                stream = streams.get(device)
                if stream is None:
                    stream = streams[device] = torch.cuda.Stream(device=device)
                with torch.cuda.stream(stream):
                    for dst, doff, at, k in pieces:
                        dst[doff:doff + k].copy_(whole[path][at:at + k], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(stream)
            except BaseException:
                torch.cuda.synchronize(pieces[0][0].device)
                rt.cudaHostUnregister(ptr)
                raise
            if prev is not None:
                prev[1].synchronize()
                rt.cudaHostUnregister(prev[0])
            prev = (ptr, ev)
    except BaseException as e:  # noqa: BLE001 - re-raised by the caller
        errors.append(e)
    finally:
        if prev is not None:
            prev[1].synchronize()
            rt.cudaHostUnregister(prev[0])
