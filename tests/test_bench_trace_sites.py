"""bench/trace_sites.py names the Python code around profiled events (used on the GPU for copies)."""

from __future__ import annotations

import gzip
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bench.trace_sites import event_sites, gpu_time_sites, main


def _matmul(a):
    return a @ a


def _three_matmuls(a):
    return [_matmul(a) for _ in range(3)]


def test_events_are_counted_by_the_python_frames_around_them(tmp_path):
    a = torch.randn(32, 32)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        _three_matmuls(a)
        torch.relu(a)
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))

    sites = event_sites(trace, ("aten::mm", "aten::relu"), depth=2)

    assert sites.total() == 4
    (matmul_site, n), (relu_site, m) = sites.most_common()
    assert n == 3 and matmul_site.startswith("test_bench_trace_sites.py:")
    assert " _matmul <- " in matmul_site and matmul_site.endswith("<listcomp>")
    assert m == 1 and "test_events_are_counted" in relu_site
    assert "torch/" not in matmul_site + relu_site, "torch's own frames are left out"


def _x(cat, name, ts, dur, tid=1, **args):
    """One complete event as torch.profiler's chrome trace writes it."""
    return {
        "ph": "X",
        "cat": cat,
        "name": name,
        "pid": 1,
        "tid": tid,
        "ts": ts,
        "dur": dur,
        "args": args,
    }


def test_gpu_time_is_summed_by_the_operators_and_python_code_that_launched_it(tmp_path):
    # A GPU profile's shape: Python frames and operators on the host thread, launches inside
    # them, and the GPU's events on their own timeline, joined to a launch by correlation id.
    forward = "vlm_ray/models/layer.py(40): forward"
    events = [
        _x("python_function", forward, 0, 100),
        _x("cpu_op", "aten::clone", 10, 30),
        _x("cpu_op", "aten::copy_", 12, 20),
        _x("cuda_runtime", "cudaMemcpyAsync", 14, 5, correlation=1),
        _x("cpu_op", "aten::clone", 50, 30),
        _x("cpu_op", "aten::copy_", 52, 20),
        _x("cuda_runtime", "cudaMemcpyAsync", 54, 5, correlation=2),
        _x("cpu_op", "aten::mm", 85, 10),
        _x("cuda_runtime", "cudaLaunchKernel", 86, 3, correlation=3),
        # the backward, on the autograd engine's thread: operators, no Python frames
        _x("cpu_op", "autograd::engine::evaluate_function: CloneBackward0", 200, 40, tid=2),
        _x("cpu_op", "aten::copy_", 210, 20, tid=2),
        _x("cuda_runtime", "cudaMemcpyAsync", 212, 5, tid=2, correlation=4),
        _x("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 20, 2000, tid=7, correlation=1),
        _x("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 2100, 1000, tid=7, correlation=2),
        _x("kernel", "nvjet_sm90_tst_128x256", 3200, 5000, tid=7, correlation=3),
        _x("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 8300, 500, tid=7, correlation=4),
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    # what the GPU machine brings back: the same trace gzipped
    (tmp_path / "trace.json.gz").write_bytes(gzip.compress(trace.read_bytes()))

    sites = gpu_time_sites(trace, ("Memcpy DtoD",))

    assert list(sites.values()) == [{"calls": 2, "gpu_ms": 3.0}, {"calls": 1, "gpu_ms": 0.5}]
    forward_copies, backward_copy = sites
    dtod = "Memcpy DtoD (Device -> Device)"
    assert forward_copies == f"{dtod} <= aten::copy_ <- aten::clone | layer.py:40 forward"
    assert backward_copy == (
        f"{dtod} <= aten::copy_ <- autograd::engine::evaluate_function: CloneBackward0"
        " | (no Python frame)"
    )
    # the GEMM's 5 ms are not a copy; asked for by name, they are the mm's
    assert gpu_time_sites(trace, ("nvjet",)) == {
        "nvjet_sm90_tst_128x256 <= aten::mm | layer.py:40 forward": {"calls": 1, "gpu_ms": 5.0}
    }
    # the gzipped copy reads the same
    assert gpu_time_sites(tmp_path / "trace.json.gz", ("Memcpy DtoD",)) == sites


def test_a_brought_back_trace_can_be_asked_again_from_the_command_line(tmp_path, capsys):
    events = [
        _x("cpu_op", "aten::clone", 10, 30),
        _x("cuda_runtime", "cudaMemcpyAsync", 14, 5, correlation=1),
        _x("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 20, 2000, tid=7, correlation=1),
        _x("cpu_op", "aten::mm", 50, 10),
        _x("cuda_runtime", "cudaLaunchKernel", 51, 3, correlation=2),
        _x("kernel", "nvjet_sm90_tst_128x256", 60, 5000, tid=7, correlation=2),
    ]
    trace = tmp_path / "trace.json.gz"
    trace.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))

    main([str(trace), "--gpu", "Memcpy DtoD", "--gpu", "nvjet"])

    out = capsys.readouterr().out
    assert out.startswith("2 GPU events, 7.0 ms, from 2 launchers")
    rows = [
        line for line in out.splitlines() if line.startswith("| 5.00") or line.startswith("| 2.00")
    ]
    assert rows == [
        "| 5.00 | 1 | nvjet_sm90_tst_128x256 <= aten::mm | (no Python frame) |",
        "| 2.00 | 1 | Memcpy DtoD (Device -> Device) <= aten::clone | (no Python frame) |",
    ]
