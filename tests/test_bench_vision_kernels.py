"""bench/vision_kernels.py times the vision tower's kernels each way torch runs them (on the GPU);
on CPU, at a tiny shape, every variant must compute the same thing as bf16 does."""

from __future__ import annotations

import json

from bench.vision_kernels import LINEARS, main


def test_every_variant_computes_what_bf16_does_and_a_backend_that_cannot_run_is_a_row_not_a_crash(
    tmp_path,
):
    out = tmp_path / "rows.jsonl"
    argv = ["--device", "cpu", "--images", "2", "--patches", "32", "--warmup", "0", "--repeat", "1"]

    rows = main([*argv, "--out", str(out)])

    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    by = {(r["kernel"], r["variant"]): r for r in rows}
    for name in LINEARS:
        assert by[(name, "bf16")]["rel_err"] == 0.0
        for variant in (
            "fp8-dynamic-rowwise",
            "fp8-dynamic-tensorwise",
            "fp8-static-tensorwise",
            "fp8-static-rowwise-gemm",
        ):
            err = by[(name, variant)]["rel_err"]
            assert 0.0 < err < 0.1, (name, variant, err)  # really float8, and close to bf16
        assert by[(name, "scaling-only-static")]["ms"] > 0
    # CPU has flash and math attention; they agree. cuDNN cannot run here: an error row.
    assert by[("attention", "math")]["rel_err"] < 0.02
    assert "error" in by[("attention", "cudnn_attention")]
    assert all(r["device"] == "cpu" and r["images"] == 2 for r in rows)
