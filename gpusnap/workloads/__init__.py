"""Built-in workloads with known data, for `gpusnap demo` and the tests."""
