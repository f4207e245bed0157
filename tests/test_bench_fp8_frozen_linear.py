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
    assert all(r["bf16_ms"] > 0 and r["fp8_ms"] > 0 for r in shapes)
    assert shapes[0]["in"] == 3584 // 32 and shapes[0]["tokens"] == 320
    assert total["bf16_ms"] == pytest.approx(
        sum(r["bf16_ms"] * r["per_step"] for r in shapes), rel=1e-2
    )
    assert total["fp8_ms"] == pytest.approx(
        sum(r["fp8_ms"] * r["per_step"] for r in shapes), rel=1e-2
    )
