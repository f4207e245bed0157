"""Copies that share a GPU say how they share it: through an MPS control daemon's pipe, their
kernels can overlap; without one, the driver time-slices the GPU and the log says so."""

from __future__ import annotations

import os
from pathlib import Path

from vlm_ray.infer.gpu_sharing import (
    DEFAULT_PIPE_DIRECTORY,
    gpu_sharing_mode,
    mps_pipe_directory,
    time_slicing_hint,
)


def _pipe_directory(tmp_path: Path, fifo: bool) -> dict[str, str]:
    """A pipe directory whose `control` entry is a FIFO, as the MPS daemon makes it, or a file."""
    folder = tmp_path / "mps"
    folder.mkdir()
    if fifo:
        os.mkfifo(folder / "control")
    else:
        (folder / "control").write_text("")
    return {"CUDA_MPS_PIPE_DIRECTORY": str(folder)}


def test_cuda_looks_for_the_daemon_in_the_pipe_directory_variable_else_tmp_nvidia_mps():
    assert mps_pipe_directory({}) == Path(DEFAULT_PIPE_DIRECTORY) == Path("/tmp/nvidia-mps")
    assert mps_pipe_directory({"CUDA_MPS_PIPE_DIRECTORY": "/run/mps"}) == Path("/run/mps")


def test_copies_sharing_a_gpu_use_mps_when_its_control_pipe_is_there(tmp_path: Path):
    mps = _pipe_directory(tmp_path, fifo=True)
    assert gpu_sharing_mode(0.5, on_gpu=True, environ=mps) == "mps"


def test_without_a_control_pipe_the_copies_are_time_sliced(tmp_path: Path):
    absent = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "none")}
    assert gpu_sharing_mode(0.3333, on_gpu=True, environ=absent) == "time-sliced"
    # a plain file of that name is no daemon
    plain = _pipe_directory(tmp_path, fifo=False)
    assert gpu_sharing_mode(0.5, on_gpu=True, environ=plain) == "time-sliced"


def test_a_copy_with_a_gpu_or_more_to_itself_or_on_cpu_claims_no_sharing(tmp_path: Path):
    mps = _pipe_directory(tmp_path, fifo=True)
    assert gpu_sharing_mode(1.0, on_gpu=True, environ=mps) is None
    # ray.num_gpus_per_worker: 2 with infer.actors_per_gpu: 2 gives each copy a whole GPU
    assert gpu_sharing_mode(2.0, on_gpu=True, environ=mps) is None
    assert gpu_sharing_mode(0.5, on_gpu=False, environ=mps) is None
    assert gpu_sharing_mode(0.0, on_gpu=True, environ=mps) is None


def test_the_log_names_how_many_actors_were_time_sliced_and_where_mps_is_explained():
    hint = time_slicing_hint(
        {
            "a:1": {"gpu_sharing": "time-sliced"},
            "a:2": {"gpu_sharing": "time-sliced"},
            "b:3": {"gpu_sharing": "mps"},
        }
    )
    assert hint is not None and hint.startswith("2 of 3 actors shared their GPU by time-slicing")
    assert "docs/deploy.md" in hint
    # nothing to say when every copy went through MPS, had its GPU alone or ran on CPU
    assert time_slicing_hint({"a:1": {"gpu_sharing": "mps"}, "a:2": {"gpu_sharing": None}}) is None
    assert time_slicing_hint({}) is None
