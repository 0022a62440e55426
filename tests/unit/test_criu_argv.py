from gpusnap.criu.argv import CriuOptions, dump_argv, restore_argv
from gpusnap.criu.locate import parse_version
from gpusnap.criu.runner import log_errors


def test_dump_leaves_stopped_by_default_and_shell_job_when_needed():
    argv = dump_argv("/c", 42, "/img", CriuOptions(shell_job=True))
    assert argv[:4] == ["/c", "dump", "--tree", "42"]
    assert "--leave-stopped" in argv and "--shell-job" in argv
    assert "--leave-running" in dump_argv("/c", 42, "/img", CriuOptions(), leave="running")
    assert "--shell-job" not in dump_argv("/c", 42, "/img", CriuOptions())


def test_restore_is_detached_with_pidfile():
    argv = restore_argv("/c", "/img", "/img/pid", CriuOptions())
    assert "--restore-detached" in argv and argv[argv.index("--pidfile") + 1] == "/img/pid"


def test_version_parsing():
    assert parse_version("Version: 4.2.1\n") == (4, 2, 1)
    assert parse_version("Version: 3.17\nGitID: x") == (3, 17)
    assert parse_version("garbage") is None


def test_log_errors_are_extracted(tmp_path):
    log = tmp_path / "restore.log"
    log.write_text("(00.001) noise\n(00.017)      1: Error (criu/cr-restore.c:1237): Can't fork for 5: File exists\n")
    assert log_errors(str(log)) == ["Can't fork for 5: File exists [criu/cr-restore.c:1237]"]


def test_tcp_established_and_file_locks_can_be_turned_off():
    from gpusnap.criu.argv import CriuOptions, dump_argv, restore_argv
    on = dump_argv("criu", 5, "/i", CriuOptions())
    assert "--tcp-established" in on and "--file-locks" in on
    off = CriuOptions(tcp_established=False, file_locks=False)
    for argv in (dump_argv("criu", 5, "/i", off), restore_argv("criu", "/i", "/p", off)):
        assert "--tcp-established" not in argv and "--file-locks" not in argv
        assert "--ext-unix-sk" in argv
