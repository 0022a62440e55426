"""Benchmarks that ship with gpusnap (`gpusnap bench`); benchmarks/ has the rest."""
