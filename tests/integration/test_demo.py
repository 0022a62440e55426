"""`gpusnap demo` end to end on the CPU workload (real CRIU)."""

from __future__ import annotations

import pytest


@pytest.mark.root
def test_demo_dumps_restores_and_checks_the_cpu_workload(gpusnap):
    rc, out, err = gpusnap("demo", "--cpu", "--mib", "16")
    assert rc == 0, err
    assert out["workload"] == "cpu" and out["report"]["data_ok"] is True
    assert out["bytes_logical"] >= 16 << 20 and out["stages"]

