"""bench/trace_sites.py names the Python code around profiled events (used on the GPU for copies)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from bench.trace_sites import event_sites


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
