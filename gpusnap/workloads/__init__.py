"""The workloads `gpusnap demo` runs, holding known data: memholder (a CPU process tree)
and torch_holder (PyTorch data on the GPU). Test and benchmark workloads: tests/workloads."""
