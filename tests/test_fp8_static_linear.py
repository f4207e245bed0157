"""infer.fp8_scaling: static (vlm_ray/models/fp8_static_linear.py, vlm_ray/infer/fp8_calibration.py):
linear layers multiply in float8 with input scales calibrated once, kept beside the predictions,
and reused by every later attempt.

torch._scaled_mm runs on CPU too, so the maths and the calibration artefact are checked here; the
infer stage itself refuses float8 without a CUDA GPU, so the pool's use of it is
tests/test_infer_gpu.py's, and its speed bench/infer_speed.py's.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from test_fp8_frozen_linear import cosine, frozen_linear
from test_infer_loading import first_logits, infer_spec
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_ray import layout
from vlm_ray.infer.fp8_calibration import (
    SCALES_FILE,
    Fp8Calibration,
    calibrated_input_scales,
    commit_or_read,
    quantize_linears_static,
)
from vlm_ray.infer.loading import ModelRef, load_for_inference
from vlm_ray.models.fp8_linear import fp8_target_linears
from vlm_ray.models.fp8_static_linear import (
    Float8StaticLinear,
    convert_linears_to_static_fp8,
    record_input_amax,
    static_input_scales,
)
from vlm_ray.stages.infer import predictions_fingerprint
from vlm_ray.storage import LocalStore


def test_scales_are_the_smallest_powers_of_two_that_fit_the_calibrated_range():
    scales = static_input_scales(
        {"a": 448.0, "b": 449.0, "c": 1.0, "d": 0.0, "e": 3000.0, "f": 1e-45}
    )
    assert scales == {"a": 1.0, "b": 2.0, "c": 2.0**-8, "d": 1.0, "e": 8.0, "f": 2.0**-126}
    # 1.0 / 2**-8 = 256 <= 448, and with 2**-9 it would be 512 > 448: nothing calibrated clips.
    with pytest.raises(ValueError, match="non-finite input at x"):
        static_input_scales({"x": math.inf})


def test_values_float8_holds_multiply_exactly():
    # Small integers are exact in e4m3 after power-of-two scaling, and so are their float32 sums:
    # a wrong scale, transpose or layout shows as a difference, not as rounding.
    g = torch.Generator().manual_seed(0)
    reference = frozen_linear(
        torch.randint(-6, 7, (48, 64), generator=g).float(),
        torch.randint(-3, 4, (48,), generator=g).float(),
    )
    x = torch.randint(-5, 6, (3, 7, 64), generator=g).float()
    (scale,) = static_input_scales({"x": x.abs().max().item()}).values()

    out = Float8StaticLinear(reference, scale)(x)

    assert out.shape == (3, 7, 48) and out.dtype == torch.float32
    assert torch.equal(out, reference(x))


def test_random_values_come_out_close_to_bf16_but_not_equal():
    g = torch.Generator().manual_seed(1)
    reference = frozen_linear(torch.randn(96, 128, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(40, 128, generator=g).to(torch.bfloat16)
    (scale,) = static_input_scales({"x": x.abs().max().item()}).values()

    out = Float8StaticLinear(reference, scale)(x)

    assert out.dtype == torch.bfloat16
    assert cosine(out, reference(x)) > 0.998
    assert not torch.equal(out, reference(x))  # it really multiplied in float8


def test_an_input_beyond_the_calibrated_range_saturates_instead_of_overflowing():
    # On CPU torch's float8 cast saturates by itself; on CUDA it does not, so the layer clamps
    # first (as torchao's to_fp8_saturated does): tests/test_fp8_static_linear_gpu.py.
    reference = frozen_linear(torch.eye(16))
    layer = Float8StaticLinear(reference, input_scale=1.0)  # calibrated range: |x| <= 448
    x = torch.tensor([[1000.0, -5000.0] + [1.0] * 14])

    out = layer(x)

    assert torch.isfinite(out).all()
    assert out[0, :2].tolist() == [448.0, -448.0]
    assert out[0, 2:].tolist() == [1.0] * 14


def test_calibration_records_each_layers_largest_input_then_lets_go():
    model = torch.nn.Sequential(
        frozen_linear(2 * torch.eye(16)), torch.nn.ReLU(), frozen_linear(torch.eye(16))
    )
    a, b = torch.zeros(1, 16), torch.zeros(1, 16)
    a[0, 0], b[0, 1] = -3.0, 2.0

    with record_input_amax(model, ["0", "2"]) as amax:
        model(a)
        model(b)
        seen = {name: value.item() for name, value in amax.items()}
    model(torch.full((1, 16), 100.0))  # after the block: no hook is left to record it

    # layer 0 saw |-3| and |2|; layer 2 saw relu(2 * x): 0 from a, 4 from b
    assert seen == {"0": 3.0, "2": 4.0}
    assert {name: value.item() for name, value in amax.items()} == seen


def test_converting_replaces_exactly_the_named_layers():
    model = torch.nn.Sequential(
        frozen_linear(torch.eye(16)), torch.nn.Sequential(frozen_linear(torch.eye(16)))
    )

    assert convert_linears_to_static_fp8(model, {"1.0": 0.5}) == 1

    assert type(model[0]) is torch.nn.Linear
    assert isinstance(model[1][0], Float8StaticLinear)
    assert model[1][0].input_scale.item() == 0.5
    assert model[1][0].weight.dtype == torch.float8_e4m3fn


# --- the calibration artefact, on the tiny Qwen2-VL and a prepared shard ---


@pytest.fixture
def calibration_setup(tmp_path, tiny_qwen2_vl, write_prepared):
    store = LocalStore(tmp_path / "run")
    write_prepared(store, rows=6, heldout=2)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl).eval()
    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    processor.tokenizer.padding_side = "left"

    def calibration(fingerprint: str = "f1", rows: int = 4) -> Fp8Calibration:
        return Fp8Calibration(
            store,
            f"{layout.predictions_dir('base')}/{SCALES_FILE}",
            layout.prepared_shard("train", 0),
            rows,
            fingerprint,
        )

    return store, model, processor, calibration


def test_static_float8_model_calibrates_commits_its_scales_and_stays_close(calibration_setup):
    store, model, processor, calibration = calibration_setup
    names = fp8_target_linears(model, "all")
    reference = first_logits(model, processor)

    assert quantize_linears_static(model, processor, "all", calibration(), batch_size=3) == len(
        names
    )

    layers = dict(model.named_modules())
    assert all(isinstance(layers[n], Float8StaticLinear) for n in names)
    saved = store.read_json(calibration().scales_key)
    assert saved["fingerprint"] == "f1"
    assert saved["calibrated_on"] == {"input_key": "prepared/train/shard-00000.parquet", "rows": 4}
    assert sorted(saved["layers"]) == sorted(names)
    for name, layer in saved["layers"].items():
        scale, amax = layer["input_scale"], layer["input_amax"]
        assert amax > 0 and amax / scale <= 448 < 2 * amax / scale  # the tightest power of two
        assert layers[name].input_scale.item() == scale
    assert cosine(first_logits(model, processor), reference) > 0.99


def test_a_later_attempt_reads_the_committed_scales_instead_of_calibrating_again(
    calibration_setup, caplog
):
    store, model, processor, calibration = calibration_setup
    names = fp8_target_linears(model, "vision")
    first = calibrated_input_scales(model, processor, names, calibration(rows=4), 4)
    committed = store.read_bytes(calibration().scales_key)

    # One row would calibrate to other maxima; the committed file wins, untouched.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlm_ray.infer.fp8_calibration"):
        again = calibrated_input_scales(model, processor, names, calibration(rows=1), 4)

    assert again == first
    assert store.read_bytes(calibration().scales_key) == committed
    assert [r.getMessage() for r in caplog.records] == [
        f"infer.fp8_scaling=static: 4 layer scales read from {store.uri_of(calibration().scales_key)}"
    ]
    assert store.read_json(calibration().scales_key)["calibrated_on"]["rows"] == 4


def test_of_two_actors_committing_scales_the_first_wins_and_the_second_gets_its(store):
    key = f"{layout.predictions_dir('base')}/{SCALES_FILE}"

    first, first_ours = commit_or_read(store, key, {"layers": {"a": {"input_scale": 1.0}}})
    second, second_ours = commit_or_read(store, key, {"layers": {"a": {"input_scale": 2.0}}})

    assert (first_ours, second_ours) == (True, False)
    assert first == second == store.read_json(key) == {"layers": {"a": {"input_scale": 1.0}}}


def test_scales_made_for_other_settings_are_refused_naming_the_file(calibration_setup):
    _, model, processor, calibration = calibration_setup
    names = fp8_target_linears(model, "vision")
    calibrated_input_scales(model, processor, names, calibration("f1"), 4)

    with pytest.raises(
        ValueError, match=rf"{SCALES_FILE} holds float8 scales calibrated for other"
    ):
        calibrated_input_scales(model, processor, names, calibration("f2"), 4)
    with pytest.raises(ValueError, match=r"scales for 4 layers, and this model has \d+ float8"):
        all_names = fp8_target_linears(model, "all")
        calibrated_input_scales(model, processor, all_names, calibration("f1"), 4)


def test_calibration_skips_rows_whose_image_does_not_decode(calibration_setup):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    store, model, processor, calibration = calibration_setup
    rows = store.read_bytes(layout.prepared_shard("train", 0))
    table = pq.read_table(io.BytesIO(rows)).to_pylist()
    table[0]["image"] = b"not an image"
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(table), buf)
    store.write_bytes(layout.prepared_shard("train", 0), buf.getvalue())
    names = fp8_target_linears(model, "vision")

    scales = calibrated_input_scales(model, processor, names, calibration(rows=3), 4)

    assert sorted(scales) == sorted(names)
    table[1]["image"] = table[2]["image"] = b"broken too"
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(table), buf)
    store.write_bytes(layout.prepared_shard("train", 0), buf.getvalue())
    store.delete(calibration().scales_key)
    with pytest.raises(
        ValueError, match="none of the 3 calibration rows has an image that decodes"
    ):
        calibrated_input_scales(model, processor, names, calibration(rows=3), 4)


def test_loading_converts_the_scopes_layers_with_the_calibrated_scales(calibration_setup):
    # What load_for_inference does after its device check (which refuses CPUs): convert, and say so.
    from vlm_ray.infer.loading import float8_layers

    store, model, processor, calibration = calibration_setup
    spec = infer_spec(store.uri, "unused", infer={"fp8": "vision", "fp8_scaling": "static"})

    vision = fp8_target_linears(model, "vision")

    note = float8_layers(model, processor, spec, calibration())

    assert note == "; float8 linear layers (vision, static calibrated scales)"
    static = [n for n, m in model.named_modules() if isinstance(m, Float8StaticLinear)]
    assert sorted(static) == sorted(vision) != []
    assert store.exists(calibration().scales_key)


def test_static_scaling_outside_the_infer_stage_is_an_error_naming_the_setting(
    tmp_path, tiny_qwen2_vl
):
    spec = infer_spec(
        str(tmp_path / "run"), tiny_qwen2_vl, infer={"fp8": "vision", "fp8_scaling": "static"}
    )
    with pytest.raises(ValueError, match=r"infer\.fp8_scaling: static calibrates its scales"):
        load_for_inference(spec, ModelRef("base", str(tiny_qwen2_vl)))


def test_calibration_rows_are_part_of_the_predictions_fingerprint(tmp_path, tiny_qwen2_vl):
    def fingerprint(**infer) -> str:
        spec = infer_spec(str(tmp_path / "run"), tiny_qwen2_vl, infer={"fp8": "vision", **infer})
        return predictions_fingerprint(spec, ModelRef("base", str(tiny_qwen2_vl)), "prepared")

    static = fingerprint(fp8_scaling="static")
    assert static == fingerprint(fp8_scaling="static", fp8_calibration_rows=256)
    assert static != fingerprint(fp8_scaling="static", fp8_calibration_rows=64)
    assert static != fingerprint(fp8_scaling="tensor")
    # Under run-time scaling the rows calibrate nothing, so they change nothing.
    assert fingerprint(fp8_scaling="row") == fingerprint(fp8_scaling="row", fp8_calibration_rows=64)


def test_the_scales_file_is_not_mistaken_for_a_predictions_shard(calibration_setup):
    from vlm_ray.stages.evaluate import list_model_tags, read_predictions

    store, model, processor, calibration = calibration_setup
    names = fp8_target_linears(model, "vision")
    calibrated_input_scales(model, processor, names, calibration(), 4)

    assert list_model_tags(store) == []
    assert read_predictions(store, "base") == {}
    assert json.loads(store.read_text(calibration().scales_key))["layers"]
