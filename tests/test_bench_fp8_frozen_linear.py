"""bench/fp8_frozen_linear.py prices train.fp8's GEMMs against bf16 per 7B linear shape; on CPU
(scaled down) it checks that every shape is timed both ways and the step total adds them up."""

from __future__ import annotations

import json

import pytest

from bench.fp8_frozen_linear import main


def test_every_shape_is_timed_both_ways_and_the_total_weights_them_by_use(tmp_path):
    out = tmp_path / "rows.jsonl"

    rows = main(
        ["--device", "cpu", "--batch", "1", "--scale", "32", "--iters", "1", "--out", str(out)]
    )

    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    shapes, total = rows[:-1], rows[-1]
    assert [r["row"] for r in shapes][:2] == ["language q/o", "language k/v"]
    assert len(shapes) == 8 and total["row"].startswith("step total")
    ways = ("bf16_ms", "fp8_row_ms", "fp8_tensor_ms")
    assert all(r[k] > 0 for r in shapes for k in ways)
    assert shapes[0]["in"] == 3584 // 32 and shapes[0]["tokens"] == 320
    for k in ways:
        by_use = sum(r[k] * r["per_step"] for r in shapes)
        assert total[k] == pytest.approx(by_use, rel=1e-2, abs=0.1)
    assert total["speedup_row"] == pytest.approx(total["bf16_ms"] / total["fp8_row_ms"], rel=1e-2)
