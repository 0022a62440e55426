"""gpusnap's CRIU action script: CUDA checkpoint and restore for checkpoints that a
container runtime drives (docker checkpoint, podman container checkpoint/restore, runc
checkpoint/restore, crun), so that a container holding GPU state can be checkpointed by
its own engine.

The entry runtimes call is the console script `gpusnap-criu-hook` (main() below);
`gpusnap hooks install` (gpusnap.criu.hook_install) writes a few lines that run it with
this gpusnap's interpreter, and names them in a CRIU config file.

What it does, by CRTOOLS_SCRIPT_ACTION (CRIU runs it once per action):

  pre-dump      before CRIU seizes the tree: lock + checkpoint CUDA for every process
                of the tree under CRTOOLS_INIT_PID that holds a /dev/nvidia* descriptor
                (a process gpusnap already checkpointed holds none and is skipped).
                Before the first lock it starts a guard process, and goes on only once
                the guard has read the pids' starting states and holds CRIU and this
                hook by pidfd; the guard waits for both to exit: if the dumped
                processes are still alive then (--leave-running, or the dump failed and
                CRIU resumed them; CRIU fires network-unlock after post-dump in both
                cases, never when the tree is killed; or this hook or CRIU was killed
                mid-way), it restores and unlocks them, undoing exactly what this hook
                did. (Not at post-dump or network-unlock themselves: CRIU runs them
                while it still holds the tasks seized and frozen, and a CUDA restore
                needs them running; the guard also covers a dump that fails before
                network-unlock could fire.) Any error here: undo, exit 1, so CRIU
                aborts the dump and the container keeps running.
  pre-resume    remembers whether gpusnap itself drives this restore (it leaves a
                `gpusnap-restore` file in the image dir; gpusnap then restores CUDA
                with its own --gpu choice).
  post-resume   the tasks run again: restore + unlock CUDA for the checkpointed
                processes of the tree, with the remap of /etc/gpusnap/config.yaml.
                (CRIU ignores this action's exit code; failures are logged, and the
                tree is killed: its CUDA calls would wait for good.)
  network-unlock  after a dump: says that the guard will restore CUDA.
  others        logged only.

A tree with no /dev/nvidia* descriptor (pre-dump) or no libcuda mapping (post-resume)
is left alone without loading libcuda. Trusted input: the CRTOOLS_* variables (each
validated) and the root-owned config; nothing else of the environment is read, and no
shell is ever run.

/etc/gpusnap/config.yaml (optional, root-owned, not group/other writable), YAML:

    log: /var/log/gpusnap-hook.log      # where each action is logged (the default)
    lock_timeout_ms: 10000              # wait for CUDA calls in flight at pre-dump
    remap:                              # restore onto other GPUs: every GPU the
      GPU-1f0e...: GPU-9c3a...          #   process had, old UUID: new UUID
    huge_pages: auto                    # off: leave the host's THP mode alone while
                                        #   the driver checkpoints (cuda/hugepages.py)
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys
import time

from ..cuda import hugepages
from ..cuda.discover import holds_nvidia_fd, touches_nvidia
from ..paths import private_dir, replace_file

CONFIG = "/etc/gpusnap/config.yaml"
DEFAULT_LOG = "/var/log/gpusnap-hook.log"
STATE_DIR = "/run/gpusnap-hook"          # root-only: checked before every use (secure_state_dir)
RESTORE_MARKER = "gpusnap-restore"      # written by gpusnap's container restores
GUARD_TIMEOUT_S = 6 * 3600
GUARD_ARM_TIMEOUT_S = 60               # for the guard to start and say it holds the state
GUARD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

ACTIONS = {"pre-dump", "post-dump", "network-lock", "network-unlock", "pre-restore",
           "setup-namespaces", "post-setup-namespaces", "post-restore", "pre-resume",
           "post-resume", "orphan-pts-master", "status-ready", "query-ext-files"}
_PID = re.compile(r"[1-9][0-9]{0,9}")


class HookError(Exception):
    pass


# ---- config ---------------------------------------------------------------------------

def parse_config(text: str) -> dict:
    """config.yaml's settings, checked: log (an absolute path), lock_timeout_ms (a
    number), remap (a mapping of GPU UUIDs), huge_pages (auto or off). Other keys are
    ignored."""
    import yaml
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise HookError(f"not valid YAML: {e}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise HookError("expected a mapping of settings")
    timeout = cfg.get("lock_timeout_ms")
    if timeout is not None and not (isinstance(timeout, int) and not isinstance(timeout, bool)
                                    and timeout >= 0 or str(timeout).isdigit()):
        raise HookError("lock_timeout_ms must be a number")
    log = cfg.get("log")
    if log is not None and not (isinstance(log, str) and os.path.isabs(log)):
        raise HookError("log must be an absolute path")
    huge = cfg.get("huge_pages")
    if huge is not None and str(huge).strip().lower() not in ("auto", "true", *hugepages.OFF):
        raise HookError("huge_pages must be auto or off")
    remap = cfg.get("remap")
    if remap is None and "remap" in cfg:
        cfg["remap"] = remap = {}
    if remap is not None and not (isinstance(remap, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in remap.items())):
        raise HookError("remap must be a mapping of GPU UUIDs, old: new")
    return cfg


def load_config(path: str = CONFIG) -> tuple[dict, str | None]:
    """(config, error). A missing file is the defaults; an unsafe or unreadable one is
    an error (the defaults are still returned, for the log path)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}, None
    except OSError as e:
        return {}, f"{path}: {e.strerror}"
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            return {}, f"{path} must be owned by root and not group/other writable"
        with os.fdopen(fd, closefd=False) as f:
            text = f.read(1 << 16)
    finally:
        os.close(fd)
    try:
        return parse_config(text), None
    except HookError as e:
        return {}, f"{path}: {e}"


# ---- logging --------------------------------------------------------------------------

class Log:
    def __init__(self, path: str, action: str):
        self.path, self.action = path or DEFAULT_LOG, action
        self.prefix = f"action={action} hook={os.getpid()}"

    def __call__(self, msg: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
        line = f"{stamp} {self.prefix} {msg}\n".encode("utf-8", "replace")
        try:            # never through a link, nor blocked by a FIFO left there
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.write(fd, line)
        finally:
            os.close(fd)


# ---- /proc ----------------------------------------------------------------------------

def parse_pid(value: str | None, what: str) -> int:
    if value is None or not _PID.fullmatch(value):
        raise HookError(f"{what} is not a pid: {value!r}")
    pid = int(value)
    if pid <= 1 or not os.path.isdir(f"/proc/{pid}"):
        raise HookError(f"{what}={pid}: no such process")
    return pid


def starttime(pid: int) -> int | None:
    """The pid's start time in clock ticks (pid and start time name a process for good),
    None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def tree_pids(root: int) -> list[int]:
    """root and its descendants (just root if it is gone)."""
    import psutil

    from ..targets.process import tree_pids as walk
    try:
        return walk(root)
    except psutil.Error:
        return [root]


def kill_tree(root: int) -> list[int]:
    """SIGKILL root and its descendants; their pids."""
    from ..targets.process import send
    pids = tree_pids(root)
    send(pids, signal.SIGKILL)
    return pids


def criu_pid() -> int:
    """CRIU runs the script through `sh -c`, which may or may not exec it."""
    pid = os.getppid()
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() in ("sh", "dash", "bash"):
                with open(f"/proc/{pid}/stat", "rb") as s:
                    data = s.read()
                pid = int(data[data.rfind(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return pid


# ---- state shared between the actions of one CRIU run ---------------------------------

def secure_state_dir() -> str:
    """STATE_DIR, private to us (its files decide which pids the hook locks and restores)."""
    return private_dir(STATE_DIR, "hook state directory")


def state_path(criu: int, start: int | None = None) -> str:
    start = starttime(criu) if start is None else start
    return os.path.join(secure_state_dir(), f"{criu}-{start or 0}.json")


def write_state(path: str, data: dict) -> None:
    secure_state_dir()
    replace_file(path, json.dumps(data).encode(), mode=0o600, fsync=False)


def read_state(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def unlink_state(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def clean_stale_states() -> None:
    """State files of CRIU runs that are over (their criu pid is gone or reused), and
    their temp files (replace_file's, of a hook killed while it wrote one)."""
    try:
        names = os.listdir(secure_state_dir())
    except OSError:
        return
    for name in names:
        m = re.fullmatch(r"([0-9]+)-([0-9]+)\.json(\.tmp-[0-9]+-[0-9a-f]+)?", name)
        if m and str(starttime(int(m.group(1))) or 0) != m.group(2):
            try:
                os.unlink(os.path.join(STATE_DIR, name))
            except OSError:
                pass


# ---- CUDA ------------------------------------------------------------------------------

def _cuda():
    """gpusnap.cuda (the driver binding loads libcuda on first use only)."""
    from .. import cuda
    return cuda


def pre_dump(init: int, cfg: dict, log) -> int:
    criu = criu_pid()                   # first: CRIU may die while CUDA is looked at
    criu_start = starttime(criu)
    candidates = [p for p in tree_pids(init) if holds_nvidia_fd(p)]
    if not candidates:
        log(f"init={init} no /dev/nvidia* in the tree: nothing to do")
        return 0
    cuda = _cuda()
    pids = cuda.cuda_pids(candidates)
    if not pids:
        log(f"init={init} /dev/nvidia* open but no CUDA context: nothing to do")
        return 0
    clean_stale_states()
    session, path, armed = None, None, False
    try:
        session = cuda.CudaSession(pids, huge_pages=hugepages.wanted(cfg.get("huge_pages", "auto")),
                                   thp_state=hugepages.DEFAULT_DIR)
        # the guard first, holding every pid's starting state: whatever stops this hook
        # from here on (an error, a kill -9, CRIU killed), the pids are brought back
        path = state_path(criu, criu_start)
        write_state(path, {"criu": criu, "criu_start": criu_start, "init": init,
                           "pids": {str(p): starttime(p) for p in pids},
                           "initial": {str(p): session.initial[p].name for p in pids}})
        spawn_guard(path, criu, criu_start)
        armed = True
        session.lock_all(int(cfg.get("lock_timeout_ms", 10_000)))
        session.checkpoint_all()
        changed = {str(p): session.initial[p].name for p in pids
                   if session.initial[p] != session.state[p]}
    except BaseException as e:
        errors = session.rollback() if session else []
        if path and not armed:
            unlink_state(path)
        log(f"init={init} FAILED, dump aborted: {_describe(e)}; rolled back"
            + (f" with errors: {'; '.join(map(str, errors))}" if errors else ""))
        return 1
    log(f"init={init} criu={criu} cuda pids {pids}: locked and checkpointed "
        f"{sorted(int(p) for p in changed)} in "
        f"{sum(session.timings.values()) * 1000:.0f} ms")
    return 0


def _describe(e: BaseException) -> str:
    """A gpusnap error's message and hint (what the hint says is often the cause)."""
    hint = getattr(e, "hint", None)
    return f"{getattr(e, 'message', e)!s}" + (f" ({hint})" if hint else "")


def _pidfd(pid: int) -> int:
    """A pidfd of pid; -1 where the kernel has none (the guard then polls start times).
    ProcessLookupError if pid is gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except (AttributeError, OSError):
        return -1


def _guard_argv(*args: str) -> list[str]:
    """This interpreter, isolated, running main() of this very module: the hook may have
    found gpusnap through a path its script added (examples/kubernetes/install-node.sh
    puts the source in /opt/gpusnap/src, render_script's source), which `-I -m` alone
    would not search."""
    source = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    boot = (f"import sys\nsource = {source!r}\n"
            f"if source not in sys.path:\n    sys.path.insert(0, source)\n"
            f"from gpusnap.criu.hook import main\nsys.exit(main())\n")
    return [sys.executable, "-I", "-c", boot, "--guard", *args]


def _open_std_fds() -> None:
    """/dev/null on each of descriptors 0-2 that is closed, so that the descriptors
    handed to the guard are none of them (its start puts /dev/null on all three). CRIU
    runs action scripts with stdin closed: pre-dump's pidfd of CRIU was 0, the guard
    polled /dev/null in its place, saw CRIU "exit" at once and undid pre-dump while
    CRIU was still dumping."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)     # the lowest free descriptor: fd


def spawn_guard(path: str, criu: int, criu_start: int | None = None) -> None:
    """A detached run of this module that undoes pre-dump once CRIU and this hook have
    both exited, if the processes outlived them. A new process, not a fork: this one
    initialises CUDA. Returns once the guard has read the state file and holds both by
    pidfd (it says so on a pipe); HookError if CRIU is gone already (its pid would be
    another process's or nobody's: the guard waited on it for hours, while nothing would
    dump the tree or undo the lock) or the guard did not come up (then it is killed).
    criu_start: CRIU's start time when the hook began."""
    from .. import interrupts, sysrun
    criu_start = starttime(criu) if criu_start is None else criu_start
    _open_std_fds()
    fds: list[int] = []
    try:
        try:
            criu_fd = _pidfd(criu)
        except ProcessLookupError:
            raise HookError(f"criu {criu} has exited: not dumping") from None
        fds.append(criu_fd)
        if criu_start is None or starttime(criu) != criu_start:    # a zombie, or reused
            raise HookError(f"criu {criu} has exited: not dumping")
        hook_fd = _pidfd(os.getpid())
        fds.append(hook_fd)
        ready_r, ready_w = os.pipe()
        fds += [ready_r, ready_w]
        with interrupts.held():
            pid = sysrun.spawn_detached(
                _guard_argv(path, str(criu), str(criu_fd), str(os.getpid()), str(hook_fd),
                            str(ready_w)),
                env={"PATH": GUARD_PATH},
                pass_fds=tuple(fd for fd in (criu_fd, hook_fd, ready_w) if fd >= 0))
            os.close(ready_w)
            fds.remove(ready_w)
            if not _armed(ready_r, GUARD_ARM_TIMEOUT_S):
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
                raise HookError("the guard that undoes this hook did not come up (the "
                                "log has its line if it got as far as logging)")
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def _armed(fd: int, timeout: float) -> bool:
    """Whether the guard wrote its word on fd within timeout (EOF: it exited first)."""
    import select
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        return False
    try:
        return os.read(fd, 16) == b"armed"
    except OSError:
        return False


def wait_exit(pid: int, start: int | None, pidfd: int, timeout: float) -> bool:
    """Whether pid (which started at start) exited within timeout."""
    deadline = time.monotonic() + timeout
    if pidfd >= 0:
        import select
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    while time.monotonic() < deadline:
        if start is None or starttime(pid) != start:
            return True
        time.sleep(0.02)
    return False


def _survivors(path: str, state: dict, criu: int, criu_start: int | None, criu_fd: int,
               hook: int, hook_start: int | None, hook_fd: int, log) -> dict[int, str] | None:
    """The processes pre-dump may have changed that are still alive once CRIU and the
    pre-dump hook have both exited, with the CUDA state each started in (the state
    file is consumed); None if they did not exit in time."""
    deadline = time.monotonic() + GUARD_TIMEOUT_S
    if not (wait_exit(criu, criu_start, criu_fd, GUARD_TIMEOUT_S)
            and wait_exit(hook, hook_start, hook_fd, deadline - time.monotonic())):
        log(f"guard: criu {criu} or hook {hook} still running after {GUARD_TIMEOUT_S} s; "
            f"giving up")
        return None
    unlink_state(path)
    initial = state.get("initial") or {}
    return {int(p): initial[p] for p, start in (state.get("pids") or {}).items()
            if p in initial and start is not None and starttime(int(p)) == start}


def guard(path: str, criu: int, criu_fd: int, hook: int, hook_fd: int, ready: int,
          cfg: dict, log) -> int:
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(STATE_DIR):
        log(f"guard: refusing state file {path}")
        return 2
    secure_state_dir()
    state = read_state(path)
    if state.get("criu") != criu:
        log(f"guard: state file {path} is not criu {criu}'s")
        return 2
    criu_start, hook_start = state.get("criu_start", starttime(criu)), starttime(hook)
    if ready >= 0:
        os.write(ready, b"armed")
        os.close(ready)
    alive = _survivors(path, state, criu, criu_start, criu_fd, hook, hook_start, hook_fd, log)
    if alive is None:
        return 1
    if not alive:
        log(f"guard: criu {criu} done; the dumped processes are gone: nothing to undo")
        return 0
    cuda = _cuda()
    pids = sorted(alive)
    try:
        init = cuda.get_driver().init()
        if init:
            log(f"guard: cuInit failed here: {cuda.get_driver().error_name(init)} ({init})")
        session = cuda.CudaSession(pids)
        for p in pids:
            session.initial[p] = cuda.CudaState[alive[p]]
        errors = session.rollback()
    except BaseException as e:
        log(f"guard: restoring CUDA for {pids} FAILED: {_describe(e)}")
        return 1
    if errors:
        log(f"guard: restoring CUDA for {pids} FAILED: {'; '.join(map(_describe, errors))}")
        return 1
    log(f"guard: criu {criu} done, processes {pids} kept running (leave-running or a "
        f"failed dump): CUDA restored and unlocked")
    return 0


def pre_resume(init: int, log) -> int:
    images = os.environ.get("CRTOOLS_IMAGE_DIR", "")
    if images and os.path.isabs(images) and os.path.exists(os.path.join(images, RESTORE_MARKER)):
        criu = criu_pid()
        clean_stale_states()
        write_state(state_path(criu), {"criu": criu, "init": init, "gpusnap_restore": True})
        log(f"init={init} gpusnap drives this restore: it restores CUDA itself")
    else:
        log(f"init={init}")
    return 0


def post_resume(init: int, cfg: dict, log) -> int:
    path = state_path(criu_pid())
    if read_state(path).get("gpusnap_restore"):
        try:
            os.unlink(path)
        except OSError:
            pass
        log(f"init={init} left to gpusnap")
        return 0
    candidates = [p for p in tree_pids(init) if touches_nvidia(p)]
    if not candidates:
        log(f"init={init} no CUDA in the tree: nothing to do")
        return 0
    cuda = _cuda()
    driver = cuda.get_driver()
    try:
        pids = [p for p in cuda.cuda_pids(candidates, driver)
                if driver.get_state(p) in (cuda.CudaState.CHECKPOINTED, cuda.CudaState.LOCKED)]
        if not pids:
            log(f"init={init} no checkpointed CUDA process: nothing to do")
            return 0
        pairs = list((cfg.get("remap") or {}).items()) or None
        session = cuda.CudaSession(pids, driver)
        session.restore_all(pairs)
        session.unlock_all()
    except BaseException as e:
        # the tasks run on, but every CUDA call of theirs would wait for good: a restored
        # tree that cannot run is not left looking alive (the checkpoint stays as it was)
        killed = kill_tree(init)
        log(f"init={init} CUDA restore FAILED: {_describe(e)}; the restored tree is "
            f"killed ({len(killed)} processes): it cannot run without its GPU state; the "
            f"checkpoint is as it was")
        return 1
    log(f"init={init} cuda pids {pids}: restored{' with remap' if pairs else ''} and unlocked "
        f"in {sum(session.timings.values()) * 1000:.0f} ms")
    return 0


# ---- entry -----------------------------------------------------------------------------

def _run_guard(argv: list[str]) -> int:
    """argv: --guard STATE CRIU CRIU_PIDFD HOOK HOOK_PIDFD READY_FD"""
    cfg, _ = load_config()
    log = Log(cfg.get("log", DEFAULT_LOG), "guard")
    try:
        path, *numbers = argv[1:]
        return guard(path, *map(int, numbers), cfg, log)
    except Exception as e:  # noqa: BLE001
        log(f"guard: FAILED: {e!r}")
        return 1


def _act(action: str, cfg: dict, cfg_error: str | None, log) -> int:
    env = os.environ
    init = None
    if action != "pre-restore" or "CRTOOLS_INIT_PID" in env:
        init = parse_pid(env.get("CRTOOLS_INIT_PID"), "CRTOOLS_INIT_PID")
    if action in ("pre-dump", "post-resume") and cfg_error:
        raise HookError(cfg_error)
    if action == "pre-dump":
        return pre_dump(init, cfg, log)
    if action == "pre-resume":
        return pre_resume(init, log)
    if action == "post-resume":
        return post_resume(init, cfg, log)
    if action == "network-unlock":
        state = read_state(state_path(criu_pid()))
        if state.get("initial"):
            log(f"init={init} the dumped tasks resume (leave-running, or the dump "
                f"failed): the guard restores CUDA for {sorted(state['initial'])} "
                f"once CRIU exits")
            return 0
    log(f"init={init}" if init else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    """What CRIU runs for each action (the `gpusnap-criu-hook` console script). Fails
    closed (exit 1) at pre-dump and post-resume only; any other action exits 0."""
    argv = sys.argv if argv is None else argv
    if len(argv) == 8 and argv[1] == "--guard":
        return _run_guard(argv[1:])
    action = os.environ.get("CRTOOLS_SCRIPT_ACTION", "")
    if action not in ACTIONS:
        return 0
    cfg, cfg_error = load_config()
    log = Log(cfg.get("log", DEFAULT_LOG), action)
    try:
        return _act(action, cfg, cfg_error, log)
    except Exception as e:  # noqa: BLE001 - fail closed, and say why
        log(f"FAILED: {e}" if isinstance(e, HookError) else f"FAILED: {e!r}")
        return 1 if action in ("pre-dump", "post-resume") else 0


if __name__ == "__main__":
    sys.exit(main())
