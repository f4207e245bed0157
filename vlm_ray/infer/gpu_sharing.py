"""How inference actors that share one GPU (infer.actors_per_gpu above 1, or a fractional
ray.num_gpus_per_worker) share it.

Without help, the driver time-slices a GPU between processes: one process's kernels run, then
another's, never at once. Two model copies then gain only where one of them leaves the GPU idle
(its host-side work between batches and between kernels); inference run 15 measured such a
two-copy pool at one process's own generate rate. NVIDIA's Multi-Process Service (MPS) funnels
the copies' work through one server, so kernels of different copies can run at the same time:
inference run 16 measured a two-copy pool through MPS 1.06x the same pool time-sliced.

A CUDA process becomes an MPS client when it starts its CUDA context while an MPS control
daemon listens on the pipe directory it looks in (CUDA_MPS_PIPE_DIRECTORY, else
/tmp/nvidia-mps). That is what is checked here: a daemon listening on the `control` pipe in that
directory (a Unix socket on current drivers, a FIFO on older ones).
"""

from __future__ import annotations

import os
import socket
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
    """Whether an MPS control daemon listens on the `control` pipe in mps_pipe_directory.

    The pipe outlives the daemon (`quit` leaves it behind; seen on the H100 machine), so its
    presence is not enough: something must be listening on it."""
    control = mps_pipe_directory(environ) / "control"
    try:
        mode = control.stat().st_mode
    except OSError:
        return False
    if stat.S_ISSOCK(mode):  # what current drivers make
        return _socket_accepts(control)
    if stat.S_ISFIFO(mode):  # what older drivers made
        return _fifo_has_reader(control)
    return False


def _socket_accepts(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at path (a stale one refuses)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _fifo_has_reader(path: Path) -> bool:
    """Whether a process has the FIFO at path open for reading: opening it for writing without
    blocking fails with ENXIO when none has. Nothing is written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    os.close(fd)
    return True


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
        "kernels run at a time. With NVIDIA MPS the copies' kernels can overlap (two copies "
        "of a 2B model ran 1.06x faster on an H100); docs/deploy.md says how to start it on GPU "
        "workers"
    )
