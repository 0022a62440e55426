"""gpusnap's SDK for cooperating PyTorch servers: weights leave GPU memory before a
checkpoint and stream back from their safetensors files after a restore, so the snapshot
does not carry them.

    import gpusnap.sdk
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda")
    agent = gpusnap.sdk.enable(model, d)             # d: a .safetensors file, a list, or a dir
    ...
    with agent.serving():                            # around every forward pass
        out = model.generate(...)

enable() matches every parameter and buffer to a tensor of the files (by name; tied
names count once), checks a sample of each against its file, and starts an agent thread
listening on /run/gpusnap/agent-<pid>.sock. `gpusnap dump` finds that socket and sends
`prepare` (the weights are dropped, the CUDA checkpoint and CRIU then take a much smaller
process), and after `gpusnap restore` it sends `resume` (the weights are read back into
GPU memory, through GPUDirect Storage where kvikio and nvidia-fs are there: see
gds_backend()). Servers that do not call enable() are checkpointed as before.
Ranks of a tensor-parallel server also register their communicators' teardown and
rebuild (collectives(), TorchGroup: collective.py), so NCCL needs no special settings.

Depends on the standard library and torch only (kvikio if installed); importing this
package imports neither: torch is imported by enable().
"""

from __future__ import annotations

from .collective import TorchGroup, collectives
from .loader import gds_backend
from .protocol import AgentError, request, socket_path
from .safetensors import HeaderError, TensorEntry, file_identity, read_header

__all__ = ["enable", "enable_hooks", "collectives", "TorchGroup", "gds_backend", "read_header", "file_identity", "request", "socket_path",
           "AgentError", "HeaderError", "TensorEntry"]


def enable(model, safetensors_files, scratch=None, *, socket_dir: str | None = None,
           name_map=None, strict: bool = True, check: str = "sample", start: bool = True,
           watchdog_s: float | None = 600.0, verify: bool = True, reader: str | None = None,
           threads: int | None = None, chunk_mb: int | None = None):
    """Register model's tensors that were loaded from safetensors_files and start the agent.

    model              an nn.Module, or a mapping name -> tensor
    safetensors_files  a path, a directory (its *.safetensors) or a list of them
    scratch            tensors (a list, or a dict name -> tensor) that may be dropped and
                       re-created zeroed: KV caches, activation buffers
    socket_dir         where the socket goes (default $GPUSNAP_AGENT_DIR or /run/gpusnap)
    name_map           module name -> file key, when they differ (a prefix, say)
    strict             a tensor named in the files with another dtype or shape is an error
                       (else it is kept in GPU memory and checkpointed as before)
    check              "sample": compare the first and last 4 KiB of each tensor with its
                       file at enable (catches weights changed after loading); "none"
    watchdog_s         resume by itself this long after a prepare nobody followed up
                       (seconds of running time; None: never)
    verify             fingerprint each tensor at prepare and compare after resume
    reader, threads, chunk_mb   see loader.py (default: gds_backend()'s choice, 8, 16)

    Returns the Agent (agent.serving(), agent.prepare(), agent.resume(), agent.status(),
    agent.on_prepare / agent.on_resume callback lists, agent.close()).
    """
    from . import registry
    from .agent import Agent
    reg = registry.build(model, safetensors_files, scratch, name_map=name_map, strict=strict)
    if check == "sample":
        bad = registry.check_against_files(reg)
        if bad:
            raise ValueError(f"{len(bad)} tensors differ from their bytes in the safetensors files "
                             f"(first: {', '.join(bad[:5])}): the model changed them after loading, so "
                             f"they cannot be reloaded from the files")
    elif check != "none":
        raise ValueError(f"check={check!r}: 'sample' or 'none'")
    agent = Agent(reg, socket_dir=socket_dir, watchdog_s=watchdog_s, verify=verify, reader=reader,
                  threads=threads, chunk=(chunk_mb << 20) if chunk_mb else None)
    return agent.start() if start else agent


def enable_hooks(prepare, resume, weight_files=(), *, socket_dir: str | None = None,
                 watchdog_s: float | None = 600.0, start: bool = True):
    """An agent for a server that drops and reloads its weights itself (vLLM's
    sleep(level=2) / wake_up + reload_weights, say: docs/vllm.md).

    prepare()        called by the agent's prepare; frees the weights. May return
                     {"bytes_dropped": n} (recorded as the bytes out of the image).
    resume()         called by resume; brings them back. May return {"bytes": n}.
    weight_files     the files resume reads: their identity goes into the snapshot, and
                     gpusnap restore refuses when one changed.
    The serving gate, the watchdog and the socket are the same as enable()'s."""
    from .agent import Agent
    from .registry import Registry
    agent = Agent(Registry(), socket_dir=socket_dir, watchdog_s=watchdog_s, verify=False,
                  weight_files=list(weight_files) if not isinstance(weight_files, str) else [weight_files])
    agent.on_prepare.append(prepare)
    agent.on_resume.append(resume)
    return agent.start() if start else agent
