"""CRIU command lines, built from plain options. Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

# What a server process typically holds and CRIU refuses without being told.
COMMON = ["--file-locks", "--tcp-established", "--ext-unix-sk", "--link-remap",
          "--manage-cgroups=ignore"]


@dataclass
class CriuOptions:
    shell_job: bool = False
    extra: list[str] = field(default_factory=list)
    verbosity: int = 4
    lazy_pages: bool = False        # restore: pages marked PE_LAZY come through userfaultfd
    leave_stopped: bool = False     # restore: the tree stays stopped (SIGSTOP) after CRIU
    tcp_established: bool = True    # dump open TCP connections (off: CRIU refuses a tree holding one)
    file_locks: bool = True         # dump flock/posix locks (off: CRIU refuses a tree holding one)
    network_lock: str | None = None # --network-lock: nftables, skip (criu/netlock.py); None: CRIU's default
    ghost_limit: int | None = None  # dump: --ghost-limit, bytes of the largest deleted file to store

    def common(self) -> list[str]:
        """COMMON, less what these options turn off, and the network lock's method."""
        off = {"--tcp-established": not self.tcp_established, "--file-locks": not self.file_locks}
        lock = ["--network-lock", self.network_lock] if self.network_lock else []
        return [flag for flag in COMMON if not off.get(flag)] + lock


def dump_argv(criu: str, pid: int, images_dir: str, opts: CriuOptions, *,
              leave: str = "stopped", ps_socket: int | None = None) -> list[str]:
    """leave: 'stopped' (gpusnap decides later: kill or resume), 'running', or 'killed'.
    ps_socket: a connected socket (fd) the pages go to (criu/pageserver.py serves it)
    instead of pages images."""
    argv = [criu, "dump", "--tree", str(pid), "--images-dir", images_dir,
            "--log-file", "dump.log", f"-v{opts.verbosity}", *opts.common()]
    if ps_socket is not None:
        argv += ["--page-server", "--ps-socket", str(ps_socket)]
    if opts.ghost_limit:
        argv += ["--ghost-limit", str(opts.ghost_limit)]
    if leave == "stopped":
        argv.append("--leave-stopped")
    elif leave == "running":
        argv.append("--leave-running")
    if opts.shell_job:
        argv.append("--shell-job")
    return argv + list(opts.extra)


def restore_argv(criu: str, images_dir: str, pidfile: str, opts: CriuOptions,
                 work_dir: str | None = None) -> list[str]:
    """work_dir: where CRIU writes its log (default: the images dir), so that images
    shared by many restores (a warm cache) are only read."""
    argv = [criu, "restore", "--images-dir", images_dir, "--log-file", "restore.log",
            f"-v{opts.verbosity}", "--restore-detached", "--pidfile", pidfile, *opts.common()]
    if work_dir:
        argv += ["--work-dir", work_dir]
    if opts.shell_job:
        argv.append("--shell-job")
    if opts.lazy_pages:
        argv.append("--lazy-pages")
    if opts.leave_stopped:
        argv.append("--leave-stopped")
    return argv + list(opts.extra)
