"""On the GPU machine: infer.fp8_scaling: static through the infer stage's pool, and the CUDA
numerics the CPU tests cannot show (skipped without a GPU of compute capability 8.9+)."""

from __future__ import annotations

import json

import pytest
from test_infer_loading import infer_spec

from vlm_ray import layout
from vlm_ray.storage import LocalStore


def _float8_gpu() -> None:
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 GEMMs need a CUDA GPU of compute capability 8.9+")


@pytest.mark.gpu
def test_an_input_beyond_the_calibrated_range_saturates_on_cuda_too():
    # On CPU torch's float8 cast saturates by itself; on CUDA it does not, which the clamp covers.
    _float8_gpu()
    import torch

    from vlm_ray.models.fp8_static_linear import Float8StaticLinear

    linear = torch.nn.Linear(16, 16, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(16))
    layer = Float8StaticLinear(linear, input_scale=1.0)
    x = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
    x[0, 0], x[0, 1] = 1000.0, -5000.0

    out = layer(x)

    assert torch.isfinite(out).all()
    assert out[0, :2].tolist() == [448.0, -448.0] and out[1:].eq(1).all()


@pytest.mark.gpu
def test_the_compiled_cast_is_bit_equal_to_the_eager_one():
    _float8_gpu()
    import torch

    from vlm_ray.models.fp8_static_linear import _compiled_cast, cast_to_e4m3

    x = torch.randn(1000, 1280, device="cuda", dtype=torch.bfloat16) * 30
    x[0, 0] = 1e5  # beyond the range: saturates in both
    scale = torch.tensor(0.125, device="cuda")

    got, want = _compiled_cast()(x, scale), cast_to_e4m3(x, scale)

    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.gpu
def test_static_float8_pool_calibrates_once_and_a_rerun_keeps_every_prediction(
    ray_cluster, write_prepared, tiny_qwen2_vl, tmp_path
):
    _float8_gpu()
    from vlm_ray.infer.fp8_calibration import SCALES_FILE
    from vlm_ray.stages.infer import run_infer

    store = LocalStore(tmp_path / "run")
    recs = write_prepared(store, rows=2, heldout=6, rows_per_shard=3)
    spec = infer_spec(
        store.uri,
        tiny_qwen2_vl,
        infer={
            "engine": "hf",
            "fp8": "all",
            "fp8_scaling": "static",
            "fp8_calibration_rows": 2,
            "compile_vision": True,
        },
    )
    manifest = run_infer(spec, models=["base"])["models"]["base"]
    scales = store.read_json(f"{layout.predictions_dir('base')}/{SCALES_FILE}")
    predictions = {
        key: store.read_text(key)
        for key in store.list(layout.predictions_dir("base"))
        if key.endswith(".jsonl") and "/_done/" not in key
    }
    rows = [json.loads(line) for text in predictions.values() for line in text.splitlines()]

    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in recs[2:])
    assert manifest["errors"] == 0 and all(r["tokens"] > 0 for r in rows)
    assert scales["fingerprint"] == manifest["fingerprint"]
    assert scales["calibrated_on"] == {
        "input_key": "prepared/heldout/shard-00000.parquet",
        "rows": 2,
    }

    # A re-run finds every shard committed and the scales in place: nothing changes.
    run_infer(spec, models=["base"])
    assert store.read_json(f"{layout.predictions_dir('base')}/{SCALES_FILE}") == scales
    assert {key: store.read_text(key) for key in predictions} == predictions
