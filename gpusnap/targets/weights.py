"""The weights files a target names: what `gpusnap dump --seed auto` seeds.

An LLM server is started with its model: `serve --model /models/llama-8b`, `vllm serve
meta-llama/Llama-3.1-8B`. For each process of the target, each argument of its command
line (and the value of each --opt=VALUE) is taken as a path, and one shaped as a Hugging
Face repository id (org/name) as a model in the process's Hugging Face cache (HF_HUB_CACHE,
HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub or HOME/.cache/huggingface/hub of its
environment; the revision refs/main names, else the only one there). A .safetensors file
is taken; a directory stands for the .safetensors files in it (DEPTH levels down at most).

The target is untrusted, and gpusnap runs as root. So every path is looked up inside the
process's own root (/proc/PID/root, openat2 with RESOLVE_IN_ROOT: a container's paths are
its own, and no symlink or `..` of it leads outside that root; a relative path inside its
working directory), each file is opened once here and read later through that open file
(/proc/self/fd/N), never by its name again, and a file is taken only where it is a regular
file the process's user could read itself (its fs uid and groups against the file's mode
bits; a uid 0 process reads anything). What is looked at is bounded (MAX_ENTRIES, MAX_FILES).
Nothing found is no error: the dump goes on without a seed.
"""

from __future__ import annotations

import ctypes
import os
import re
import stat
from dataclasses import dataclass, field

SUFFIX = ".safetensors"
DEPTH = 3                       # directory levels below a named directory
MAX_FILES = 512                 # weights files at most, over the whole target
MAX_ENTRIES = 20000             # directory entries looked at, over the whole target
MAX_ARGS = 4096                 # command-line arguments looked at, a process

_SYS_OPENAT2 = 437              # the same number on every architecture (Linux 5.6)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_in_root(root_fd: int, path: str, flags: int) -> int:
    """path opened with openat2(RESOLVE_IN_ROOT) under root_fd: absolute symlinks and `..`
    stay inside it. OSError where it can't be (ENOSYS: a kernel before 5.6)."""
    how = _OpenHow(flags | os.O_CLOEXEC | os.O_NOCTTY, 0,
                   _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd),
                       ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


@dataclass
class Found:
    """The weights files found: sources (their paths as the target sees them) and paths
    to read them by (/proc/self/fd/N of the files held open here: close() them)."""
    sources: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def keep(self, indices: list[int]) -> None:
        """Only the files at these indices stay found; the others are closed."""
        wanted = set(indices)
        for i, fd in enumerate(self.fds):
            if i not in wanted:
                os.close(fd)
        self.sources, self.paths, self.fds = ([x for i, x in enumerate(xs) if i in wanted]
                                              for xs in (self.sources, self.paths, self.fds))

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


@dataclass(frozen=True)
class Creds:
    """Who a process reads files as (/proc/PID/status: fs uid, fs gid, groups)."""
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


def readable(st: os.stat_result, who: Creds, bits: tuple[int, int, int] = (
        stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)) -> bool:
    """Whether who may read a file of this stat by its mode bits (bits: those of the
    owner, group and others to look at; ACLs are not looked at: a file they alone open
    is left out). Pure."""
    if who.uid == 0:
        return True
    if st.st_uid == who.uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid == who.gid or st.st_gid in who.groups:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


_SEARCH = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)


def creds_of(status: str) -> Creds:
    """Creds from /proc/PID/status's text."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid = int(fields["Uid"].split()[3])
    gid = int(fields["Gid"].split()[3])
    return Creds(uid, gid, frozenset(int(g) for g in fields.get("Groups", "").split()))


def arguments(argv: list[str]) -> list[str]:
    """What of a command line may name a model: each argument, and the value of each
    --opt=VALUE; the program itself left out. Pure."""
    out = []
    for arg in argv[1:MAX_ARGS]:
        if arg.startswith("-") and "=" in arg:
            arg = arg.split("=", 1)[1]
        if arg and not arg.startswith("-") and "\0" not in arg:
            out.append(arg)
    return out


def hub_dirs(env: dict[str, str]) -> list[str]:
    """The Hugging Face hub caches an environment points at, in the library's order. Pure."""
    out = []
    if env.get("HF_HUB_CACHE"):
        out.append(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        out.append(os.path.join(env["HF_HOME"], "hub"))
    if env.get("XDG_CACHE_HOME"):
        out.append(os.path.join(env["XDG_CACHE_HOME"], "huggingface", "hub"))
    if env.get("HOME"):
        out.append(os.path.join(env["HOME"], ".cache", "huggingface", "hub"))
    return [d for d in dict.fromkeys(out) if os.path.isabs(d)]


def repo_dir(repo_id: str) -> str | None:
    """A hub cache's directory of a model repository id (org/name), or None where the
    argument is not shaped as one. Pure."""
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        return None
    return "models--" + repo_id.replace("/", "--")


def discover(pids: list[int]) -> Found:
    """The weights files the processes of pids name (see the module's text)."""
    found = _Finder()
    try:
        for pid in pids:
            found.process(pid)
    except BaseException:
        found.out.close()
        raise
    return found.out


class _Finder:
    def __init__(self):
        self.out = Found()
        self.seen: set[tuple[int, int]] = set()      # (st_dev, st_ino) of the files taken
        self.entries = 0

    def process(self, pid: int) -> None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().split(b"\0")[:MAX_ARGS]]
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split("=", 1) for e in (os.fsdecode(x) for x in f.read().split(b"\0"))
                           if "=" in e)
            with open(f"/proc/{pid}/status") as f:
                who = creds_of(f.read())
            root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except (OSError, KeyError, ValueError, IndexError):
            return                              # gone, or not a process to look into
        try:
            cwd = os.open(f"/proc/{pid}/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            cwd = None
        try:
            for arg in arguments(argv):
                self.named(root, cwd, arg, who, env)
        finally:
            os.close(root)
            if cwd is not None:
                os.close(cwd)

    def named(self, root: int, cwd: int | None, arg: str, who: Creds, env: dict) -> None:
        if os.path.isabs(arg):
            self.path(root, arg, arg, who)
        elif cwd is not None and self.path(cwd, arg, arg, who):
            return
        if (name := repo_dir(arg)) is None:
            return
        for hub in hub_dirs(env):
            snapshot = self.revision(root, os.path.join(hub, name))
            if snapshot and self.path(root, snapshot, snapshot, who):
                return

    def revision(self, root: int, repo: str) -> str | None:
        """The snapshot directory of a hub cache's repository: refs/main's, else the only one."""
        try:
            fd = open_in_root(root, os.path.join(repo, "refs", "main"), os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    rev = f.read(128).decode("ascii", "replace").strip()
                    if re.fullmatch(r"[0-9a-f]{7,64}", rev):
                        return os.path.join(repo, "snapshots", rev)
        except OSError:
            pass
        try:
            fd = open_in_root(root, os.path.join(repo, "snapshots"), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        try:
            names = [e.name for e in os.scandir(fd)][:2]
        finally:
            os.close(fd)
        return os.path.join(repo, "snapshots", names[0]) if len(names) == 1 else None

    def path(self, base: int, path: str, shown: str, who: Creds, depth: int = 0) -> bool:
        """Take path (a weights file, or a directory of them) under base; whether it was
        a file or directory there at all."""
        if len(self.out.fds) >= MAX_FILES or self.entries >= MAX_ENTRIES:
            return False
        self.entries += 1
        try:
            fd = open_in_root(base, path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return False
        if stat.S_ISDIR(st.st_mode):
            try:
                self.directory(base, path, shown, who, depth, st, fd)
            finally:
                os.close(fd)
            return True
        if not (stat.S_ISREG(st.st_mode) and shown.endswith(SUFFIX) and st.st_size > 0
                and (st.st_dev, st.st_ino) not in self.seen and readable(st, who)):
            os.close(fd)
            return stat.S_ISREG(st.st_mode)
        self.seen.add((st.st_dev, st.st_ino))
        self.out.fds.append(fd)
        self.out.paths.append(f"/proc/self/fd/{fd}")
        self.out.sources.append(os.path.normpath(shown))
        return True

    def directory(self, base: int, path: str, shown: str, who: Creds, depth: int,
                  st: os.stat_result, fd: int) -> None:
        if depth >= DEPTH or not (readable(st, who) and readable(st, who, _SEARCH)):
            return
        try:
            entries = sorted(e.name for e in os.scandir(fd))
        except OSError:
            return
        for name in entries[:max(0, MAX_ENTRIES - self.entries)]:
            child = os.path.join(path, name)
            if name.endswith(SUFFIX):
                self.path(base, child, os.path.join(shown, name), who, depth + 1)
            else:
                self.entries += 1
                try:            # a subdirectory itself, never through a symlink
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=fd)
                except OSError:
                    continue
                os.close(sub)
                self.path(base, child, os.path.join(shown, name), who, depth + 1)
