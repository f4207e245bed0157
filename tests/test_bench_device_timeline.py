"""bench/device_timeline.py: the device's busy share, its idle gaps, and what the host did in them."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from bench.device_timeline import (
    Span,
    all_threads_config,
    device_timeline,
    host_during,
    idle_by_phase,
    idle_gaps,
)
from vlm_ray.config import GenerationSpec
from vlm_ray.infer.generation import predict_table


def test_idle_gaps_are_the_holes_in_the_union_of_overlapping_kernels():
    kernels = [Span(0, 10, "a"), Span(5, 20, "b"), Span(30, 40, "c"), Span(32, 35, "d")]
    busy, gaps = idle_gaps(kernels)
    assert busy == 30  # [0, 20] and [30, 40]
    assert gaps == [(20, 30, "b", "c")]


def test_a_gap_names_each_threads_innermost_range_that_covers_most_of_it():
    host = [
        Span(0, 100, "vlm_ray.decode_text", thread=1),
        Span(15, 28, "aten::item", thread=1),  # inside the phase, covers 8 of the gap's 10 us
        Span(18, 30, "vlm_ray.processor", thread=2),  # covers 10: the thread with most overlap
        Span(0, 5, "aten::mm", thread=3),  # not during the gap
    ]
    assert host_during(20, 30, host) == [
        {"thread": 2, "in": "vlm_ray.processor", "overlap_ms": 0.01},
        {"thread": 1, "in": "vlm_ray.decode_text", "overlap_ms": 0.01},
    ]


def test_idle_time_is_summed_per_phase_of_ours_and_other_ranges_are_left_out():
    gaps = [(20, 30, "b", "c"), (50, 60, "c", "d")]
    host = [
        Span(0, 55, "vlm_ray.decode_text", thread=1),
        Span(25, 60, "vlm_ray.processor", thread=2),
        Span(0, 100, "aten::copy_", thread=3),
    ]
    assert idle_by_phase(gaps, [*host, Span(0, 100, "aten::copy_")]) == {
        "vlm_ray.decode_text": 0.0,  # 15 us rounds to 0.0 ms
        "vlm_ray.processor": 0.0,
    }
    wide = [(g0 * 1000, g1 * 1000, a, b) for g0, g1, a, b in gaps]
    wide_host = [Span(s.start * 1000, s.end * 1000, s.name, s.thread) for s in host]
    assert idle_by_phase(wide, wide_host) == {
        "vlm_ray.processor": 15.0,
        "vlm_ray.decode_text": 15.0,
    }


def _png(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (n * 40 % 255, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def profiled_predict_table(tiny_generator):
    """A real torch.profiler trace of predict_table over 6 rows (3 batches) on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    model, processor = tiny_generator
    rows = [
        {
            "id": f"r{i}",
            "source_id": str(i),
            "image": _png(i),
            "width": 56,
            "height": 56,
            "prompt": "Read it.",
            "system_prompt": None,
            "text": None,
            "messages": None,
        }
        for i in range(6)
    ]
    spec = GenerationSpec(max_new_tokens=4, min_p=None, do_sample=False, batch_size=2)
    with profile(
        activities=[ProfilerActivity.CPU], experimental_config=all_threads_config()
    ) as prof:
        records = predict_table(model, processor, pa.Table.from_pylist(rows), spec)
    assert len(records) == 6
    return prof.events()


def test_predict_table_marks_its_phases_in_every_thread_for_the_profiler(profiled_predict_table):
    # decode_images and processor run in predict_table's preprocessing thread
    names = {e.name for e in profiled_predict_table}
    for phase in ("decode_images", "processor", "wait_for_prepared", "wait_for_gpu", "generate"):
        assert f"vlm_ray.{phase}" in names
    assert "vlm_ray.decode_text" in names


def test_a_real_profile_gives_a_consistent_timeline(profiled_predict_table):
    # On the CPU the "device" spans are the CPU ops themselves: a plumbing check of the adapter.
    timeline = device_timeline(profiled_predict_table, "CPU", gaps=3)
    assert timeline["kernels"] > 100
    assert 0 < timeline["busy_ms"] <= timeline["wall_ms"]
    assert 0 < timeline["busy_fraction"] <= 1
    assert len(timeline["largest_gaps"]) <= 3
    assert all(g["ms"] >= 0 for g in timeline["largest_gaps"])
