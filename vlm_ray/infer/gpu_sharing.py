"""How inference actors that share one GPU (infer.actors_per_gpu above 1, or a fractional
ray.num_gpus_per_worker) share it.

Without help, the driver time-slices a GPU between processes: one process's kernels run, then
another's, never at once. Two model copies then gain only where one of them leaves the GPU idle
(its host-side work between batches and between kernels); inference run 15 measured such a
two-copy pool at one process's own generate rate. NVIDIA's Multi-Process Service (MPS) funnels
the copies' work through one server, so kernels of different copies can run at the same time.

A CUDA process becomes an MPS client when it starts its CUDA context while an MPS control
daemon listens on the pipe directory it looks in (CUDA_MPS_PIPE_DIRECTORY, else
/tmp/nvidia-mps). That is what is checked here: the daemon's `control` pipe in that directory.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"

MPS = "mps"
TIME_SLICED = "time-sliced"


def mps_pipe_directory(environ: Mapping[str, str] = os.environ) -> Path:
    """The folder where CUDA looks for an MPS control daemon's pipes."""
    return Path(environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIRECTORY)


def mps_daemon_listening(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether an MPS control daemon's `control` pipe (a FIFO) is in mps_pipe_directory."""
    try:
        return stat.S_ISFIFO((mps_pipe_directory(environ) / "control").stat().st_mode)
    except OSError:
        return False


def gpu_sharing_mode(
    gpu_share: float, on_gpu: bool, environ: Mapping[str, str] = os.environ
) -> str | None:
    """ "mps" or "time-sliced" for a copy given a fraction of a GPU (gpu_share below 1, from
    infer.actors_per_gpu or a fractional ray.num_gpus_per_worker); None for a copy with a GPU
    or more to itself, or on CPU."""
    if not on_gpu or not 0 < gpu_share < 1:
        return None
    return MPS if mps_daemon_listening(environ) else TIME_SLICED


def time_slicing_hint(summary: Mapping[str, Mapping[str, object]]) -> str | None:
    """A sentence for the log when copies that share a GPU were time-sliced, None otherwise."""
    sliced = [a for a in summary.values() if a.get("gpu_sharing") == TIME_SLICED]
    if not sliced:
        return None
    return (
        f"{len(sliced)} of {len(summary)} actors shared their GPU by time-slicing (no MPS "
        f"control daemon in their CUDA_MPS_PIPE_DIRECTORY, else {DEFAULT_PIPE_DIRECTORY}): one copy's "
        "kernels run at a time. With NVIDIA MPS the copies' kernels can overlap; "
        "docs/deploy.md says how to start it on GPU workers"
    )
