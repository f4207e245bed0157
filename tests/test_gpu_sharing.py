"""Copies that share a GPU say how they share it: through an MPS control daemon listening on its
pipe, their kernels can overlap; without one (or with only the pipe a stopped daemon left
behind), the driver time-slices the GPU and the log says so."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlm_ray.infer.gpu_sharing import (
    DEFAULT_PIPE_DIRECTORY,
    gpu_sharing_mode,
    mps_pipe_directory,
    time_slicing_hint,
)


@pytest.fixture
def pipe_directory() -> Iterator[Path]:
    """An empty pipe directory with a short path: a Unix socket's path must fit in 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="mps", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _environ(folder: Path) -> dict[str, str]:
    return {"CUDA_MPS_PIPE_DIRECTORY": str(folder)}


@pytest.fixture
def listening_daemon(pipe_directory: Path) -> Iterator[dict[str, str]]:
    """A process listening on `control` as a Unix socket, as current MPS control daemons do."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(pipe_directory / "control"))
        server.listen()
        yield _environ(pipe_directory)


def test_cuda_looks_for_the_daemon_in_the_pipe_directory_variable_else_tmp_nvidia_mps():
    assert mps_pipe_directory({}) == Path(DEFAULT_PIPE_DIRECTORY) == Path("/tmp/nvidia-mps")
    assert mps_pipe_directory({"CUDA_MPS_PIPE_DIRECTORY": "/run/mps"}) == Path("/run/mps")


def test_copies_sharing_a_gpu_use_mps_when_a_daemon_listens_on_its_control_socket(
    listening_daemon: dict[str, str],
):
    assert gpu_sharing_mode(0.5, on_gpu=True, environ=listening_daemon) == "mps"


def test_a_control_socket_left_behind_by_a_stopped_daemon_means_time_sliced(pipe_directory: Path):
    # `echo quit | nvidia-cuda-mps-control` stops the daemon but leaves its socket file
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(pipe_directory / "control"))
    assert (pipe_directory / "control").is_socket()
    assert gpu_sharing_mode(0.5, on_gpu=True, environ=_environ(pipe_directory)) == "time-sliced"


def test_an_older_daemon_s_control_fifo_counts_only_while_it_is_open_for_reading(
    pipe_directory: Path,
):
    control = pipe_directory / "control"
    os.mkfifo(control)
    environ = _environ(pipe_directory)
    assert gpu_sharing_mode(0.5, on_gpu=True, environ=environ) == "time-sliced"
    reader = os.open(control, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert gpu_sharing_mode(0.5, on_gpu=True, environ=environ) == "mps"
    finally:
        os.close(reader)


def test_without_a_control_pipe_the_copies_are_time_sliced(pipe_directory: Path):
    absent = _environ(pipe_directory / "none")
    assert gpu_sharing_mode(0.3333, on_gpu=True, environ=absent) == "time-sliced"
    # a plain file of that name is no daemon
    (pipe_directory / "control").write_text("")
    assert gpu_sharing_mode(0.5, on_gpu=True, environ=_environ(pipe_directory)) == "time-sliced"


def test_a_copy_with_a_gpu_or_more_to_itself_or_on_cpu_claims_no_sharing(
    listening_daemon: dict[str, str],
):
    mps = listening_daemon
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
