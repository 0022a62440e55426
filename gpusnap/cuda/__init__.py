"""The CUDA driver checkpoint API and the per-pid state machine around it.

Importing this package loads neither libcuda nor NVML; both load on first use.
"""

from gpusnap.cuda.discover import GpuInfo, GpuProcess, HostGpus, cuda_pids, host_gpus
from gpusnap.cuda.driver import CudaCallFailed, CudaDriver, CudaState, get_driver
from gpusnap.cuda.session import CudaSession

__all__ = ["CudaCallFailed", "CudaDriver", "CudaSession", "CudaState", "GpuInfo",
           "GpuProcess", "HostGpus", "cuda_pids", "get_driver", "host_gpus"]
