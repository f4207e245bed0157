"""bench/vision_kernels.py times the vision tower's kernels each way torch runs them (on the GPU);
on CPU, at a tiny shape, every variant must compute the same thing as bf16 does."""

from __future__ import annotations

import json

from bench.vision_kernels import LANGUAGE_LINEARS, LINEARS, main


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


def test_language_rows_price_each_language_linear_in_the_prefill_and_one_decoding_step(tmp_path):
    argv = ["--device", "cpu", "--images", "2", "--patches", "16", "--warmup", "0", "--repeat", "1"]

    rows = main([*argv, "--language", "--language-tokens", "8", "--out", str(tmp_path / "r")])

    by = {(r["kernel"], r["variant"]): r for r in rows}
    for name, (k_in, n_out) in LANGUAGE_LINEARS.items():
        assert by[(f"{name} prefill", "bf16")]["shape"] == [2 * 8, k_in, n_out]
        assert by[(f"{name} decode", "bf16")]["shape"] == [2, k_in, n_out]
        assert 0.0 < by[(f"{name} prefill", "fp8-static-tensorwise")]["rel_err"] < 0.1
    assert all(r["language_tokens_per_image"] == 8 for r in rows)
