import os

import click


@click.command("bench")
@click.option("--size", type=click.Choice(["tiny", "0.5b", "1b", "1.5b", "8b"]), default="tiny",
              show_default=True, help="Model size of the benchmark server (random weights).")
@click.option("--runs", type=int, default=2, show_default=True, help="Runs of each measurement (medians).")
@click.option("--sdk", is_flag=True, help="Also the server with gpusnap.sdk (weights out of the snapshot).")
@click.option("--out", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Where the JSON and markdown results go.")
@click.option("--work", type=click.Path(file_okay=False), default="/tmp/gpusnap-bench", show_default=True,
              help="Scratch: model files and the benchmark's own store.")
@click.pass_obj
def command(app, size, runs, sdk, out, work):
    """Cold start vs naive CRIU+CUDA vs gpusnap restore of an LLM server, on this GPU.

    Runs benchmarks/cold_start.py of the source checkout this gpusnap runs from, small.
    Needs an NVIDIA GPU, PyTorch and transformers. Prints the table and writes it to OUT.
    """
    from ..engine.demo import gpu_available
    from ..errors import CudaUnavailable
    if not gpu_available():
        raise CudaUnavailable("gpusnap bench needs an NVIDIA GPU and PyTorch",
                              hint="gpusnap demo runs a CPU workload anywhere")
    argv = ["--sizes", size, "--runs", str(runs), "--out", os.path.abspath(out), "--work", work]
    path = _harness().main(argv + (["--sdk"] if sdk else []))
    app.emit({"results": path}, f"results: {path}")


def _harness():
    """benchmarks/cold_start.py beside the package: the harness is not shipped in it."""
    import importlib.util

    from ..errors import UsageError
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(checkout, "benchmarks", "cold_start.py")
    if not os.path.isfile(path):
        raise UsageError("gpusnap bench runs the benchmark harness of a source checkout, and "
                         "this gpusnap is not one",
                         hint="clone gpusnap and run python benchmarks/cold_start.py there")
    spec = importlib.util.spec_from_file_location("gpusnap_cold_start_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
