"""bench/fp8_quantize_split.py prices the float8 quantizing of down's input fused into what makes
the row (as Inductor compiles it inside Unsloth's blocks) against split behind a custom op; on CPU
(scaled down, real Inductor) both give the same float8 rows and scales, Inductor's code for the
split way calls the custom op where the fused way's does not, and every way is timed."""

from __future__ import annotations

import json

import torch

from bench.fp8_quantize_split import WAYS, main, ways


def test_split_quantizing_is_the_same_float8_behind_an_op_inductor_cannot_fuse(tmp_path):
    from torch._inductor.utils import run_and_get_code

    out = tmp_path / "rows.jsonl"
    rows = main(["--device", "cpu", "--scale", "64", "--iters", "1", "--out", str(out)])

    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert [r["way"] for r in rows] == list(WAYS)
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["fused_equals_split"] for r in rows)

    inputs = [torch.randn(16, 64, dtype=torch.bfloat16) for _ in range(4)]
    compiled = ways()
    _, fused_code = run_and_get_code(compiled["fused"], *inputs)
    _, split_code = run_and_get_code(compiled["split"], *inputs)
    assert "vlm_ray_bench.quantize_rows" in "".join(split_code)
    assert "vlm_ray_bench.quantize_rows" not in "".join(fused_code)
