"""Workloads with known data for the tests and benchmarks (run from the checkout:
`python -m tests.workloads.NAME`). The two that `gpusnap demo` runs live in gpusnap.workloads."""
