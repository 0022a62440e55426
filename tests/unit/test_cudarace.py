"""A process of the target that starts using the GPU during a dump: how gpusnap tells
(engine/cudarace.py) and how CRIU's failure is put (criu/runner.py). Pure: pid lists,
a stand-in for the driver's test, and CRIU log lines as CRIU 4.2 writes them."""

from __future__ import annotations

import pytest

from gpusnap.criu import runner
from gpusnap.engine import cudarace
from gpusnap.errors import GpuRace

# what the run on the GPU machine logged, in CRIU's log format
RACE_LOG = """\
(00.000100) Warn  (criu/kerndat.c:1): something harmless
(00.001000) Error (criu/util.c:1633): Failed to set RLIMIT_NOFILE to 1048576: Operation not permitted
(17.000000) Error (criu/files-reg.c:88): handle_device_vma plugin failed: No such file or directory
(17.000100) Error (criu/proc_parse.c:691): Can't handle non-regular mapping on 4242's map 7f0000000000
(17.000200) Error (criu/cr-dump.c:2100): Dumping FAILED.
"""


def cuda_among(holding):
    """A stand-in for gpu.cuda_pids: the pids of the list that are in holding."""
    return lambda pids: [p for p in pids if p in holding]


def test_a_new_cuda_pid_after_the_checkpoint_is_the_race():
    with pytest.raises(cudarace.Started) as info:
        cudarace.check([10, 11, 12, 13], known=[11], cuda_pids=cuda_among({11, 13}))
    assert info.value.pid == 13


def test_no_new_cuda_pid_lets_the_dump_go_on():
    cudarace.check([10, 11, 12], known=[11], cuda_pids=cuda_among({11}))
    cudarace.check([10, 12], known=[], cuda_pids=cuda_among(set()))
    assert cudarace.newcomers([1, 2], [1, 2], cuda_among({1, 2})) == []


def test_the_known_pids_are_not_asked_about_again():
    asked = []
    cudarace.newcomers([1, 2, 3], [1, 2], lambda pids: asked.extend(pids) or [])
    assert asked == [3]


def test_criu_failing_on_a_device_mapping_of_an_unheld_pid_is_the_race(tmp_path):
    log = tmp_path / "dump.log"
    log.write_text(RACE_LOG)
    errors = runner.log_errors(str(log))
    # the child already exited: no CUDA pid now, CRIU's log names it
    started = cudarace.after_criu(errors, [10], [10], cuda_among(set()), gpu_user=lambda p: True)
    assert started is not None and started.pid == 4242
    # a pid gpusnap held (checkpointed) is not the race; nor another device's mapping
    assert cudarace.after_criu(errors, [10], [4242], cuda_among(set()), lambda p: True) is None
    assert cudarace.after_criu(errors, [10], [10], cuda_among(set()), lambda p: False) is None


def test_criu_failing_while_a_new_cuda_pid_runs_is_the_race():
    started = cudarace.after_criu(["Something else [x.c:1]"], [10, 20], [10], cuda_among({10, 20}))
    assert started.pid == 20
    assert cudarace.after_criu(["Something else [x.c:1]"], [10], [10], cuda_among({10})) is None


def test_the_error_leads_with_the_cause_and_has_its_exit_code():
    err = cudarace.race_error(4242, "process")
    assert err.message == "a process of the tree started using the GPU during the dump: pid 4242"
    assert err.exit_code == 26 and isinstance(err, GpuRace)
    assert "container" in cudarace.race_error(None, "docker").message


def test_criu_errors_lead_with_the_cause_not_noise_or_summaries(tmp_path):
    log = tmp_path / "dump.log"
    log.write_text(RACE_LOG)
    errors = runner.log_errors(str(log))
    assert errors[0].startswith("handle_device_vma plugin failed")
    assert errors[1].startswith("Can't handle non-regular mapping on 4242's map")
    assert [e.split(" ")[0] for e in errors[2:]] == ["Failed", "Dumping"]
    from gpusnap import sysrun
    exc = runner._fail("dump", sysrun.Result(["criu"], 1, "", ""), str(log))
    assert exc.message.startswith("criu dump failed (exit 1): handle_device_vma plugin failed")
