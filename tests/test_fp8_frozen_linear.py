"""train.fp8 (vlm_ray/models/fp8_frozen_linear.py): LoRA's frozen base layers multiply in float8,
forward and input gradient, and compute what bf16 computes up to float8's rounding.

torch._scaled_mm runs on CPU too, so the maths is checked here; the speed (the reason for it) is
priced on a GPU by bench/fp8_frozen_linear.py and bench/train_speed.py, and the stage's CUDA
path by tests/test_fp8_frozen_linear_gpu.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vlm_ray.config import parse_spec
from vlm_ray.models.fp8_frozen_linear import (
    Float8FrozenLinear,
    convert_lora_base_layers_to_fp8,
    fp8_layer_count,
    fp8_weight_count,
    restore_bf16_base_layers,
)


def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.nn.Linear:
    """A frozen nn.Linear with this weight (and bias), in the weight's dtype."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.to(weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def _output_and_input_grad(layer, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    return out.detach(), grad_x


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float32."""
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_values_float8_holds_multiply_exactly_forward_and_backward(scaling: str):
    # Small integers are exact in e4m3 and e5m2 after power-of-two scaling (and their sums in
    # float32), so any mistake in scales, transposes or layouts shows as a difference, not as
    # rounding.
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-6, 7, (48, 64), generator=g).to(torch.float32)
    bias = torch.randint(-3, 4, (48,), generator=g).to(torch.float32)
    reference = frozen_linear(weight, bias)
    x = torch.randint(-5, 6, (3, 7, 64), generator=g).to(torch.float32)
    grad = torch.randint(-4, 5, (3, 7, 48), generator=g).to(torch.float32)

    out, grad_x = _output_and_input_grad(Float8FrozenLinear(reference, scaling), x, grad)
    ref_out, ref_grad_x = _output_and_input_grad(reference, x, grad)

    assert out.dtype == torch.float32 and out.shape == (3, 7, 48)
    assert torch.equal(out, ref_out)
    assert torch.equal(grad_x, ref_grad_x)


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_random_values_come_out_close_to_bf16_but_not_equal(scaling: str):
    g = torch.Generator().manual_seed(1)
    reference = frozen_linear(torch.randn(96, 128, generator=g).to(torch.bfloat16) * 0.05)
    x = torch.randn(40, 128, generator=g).to(torch.bfloat16)
    grad = torch.randn(40, 96, generator=g).to(torch.bfloat16)

    out, grad_x = _output_and_input_grad(Float8FrozenLinear(reference, scaling), x, grad)
    ref_out, ref_grad_x = _output_and_input_grad(reference, x, grad)

    assert cosine(out, ref_out) > 0.998
    assert cosine(grad_x, ref_grad_x) > 0.995
    assert not torch.equal(out, ref_out)  # it really multiplied in float8


def test_per_token_scales_keep_ordinary_tokens_precise_beside_an_outlier_token():
    # One token 30,000 times larger than the rest (the "massive activations" of LLMs reach
    # such ratios): with one scale for the tensor the ordinary tokens fall toward float8's
    # subnormals and lose precision; with one scale per token they keep it.
    g = torch.Generator().manual_seed(4)
    reference = frozen_linear(torch.randn(64, 128, generator=g) * 0.05)
    x = torch.randn(32, 128, generator=g) * 0.02
    x[0] *= 30_000
    ref = reference(x)[1:]

    def error(scaling: str) -> float:
        out = Float8FrozenLinear(reference, scaling)(x)[1:]
        return ((out - ref).norm() / ref.norm()).item()

    assert error("row") < 0.05
    assert error("tensor") > 2.5 * error("row")


def test_the_weight_takes_one_byte_gets_no_gradient_and_survives_a_dtype_cast():
    reference = frozen_linear(torch.randn(32, 64).to(torch.bfloat16))
    layer = Float8FrozenLinear(reference)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    before = layer(x)

    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.element_size() == 1
    assert layer.weight_bits.nbytes == 32 * 64
    assert list(layer.parameters()) == []  # no bias here, and the weight is not a parameter
    # a model-wide cast (as some trainers do) leaves the float8 bits alone
    torch.nn.Sequential(layer).to(torch.float32).to(torch.bfloat16)
    assert layer.weight_bits.dtype == torch.uint8
    assert torch.equal(layer(x), before)


def test_a_trained_bias_gets_the_same_gradient_as_in_bf16():
    g = torch.Generator().manual_seed(2)
    weight = torch.randint(-3, 4, (16, 32), generator=g).float()
    reference = frozen_linear(weight, torch.zeros(16))
    reference.bias.requires_grad_(True)
    layer = Float8FrozenLinear(reference)
    x = torch.randint(-2, 3, (6, 32), generator=g).float()

    layer(x).pow(2).sum().backward()
    fp8_grad = reference.bias.grad.clone()  # the same Parameter object
    reference.bias.grad = None
    reference(x).pow(2).sum().backward()

    assert layer.bias is reference.bias
    assert torch.equal(fp8_grad, reference.bias.grad)


def test_a_lora_model_trains_close_to_bf16_with_every_aligned_base_layer_in_float8(
    tiny_qwen2_vl: Path, lora_model, sft_collator, two_sft_examples, loss_and_lora_grads
):
    bf16 = torch.bfloat16
    reference, converted = lora_model(tiny_qwen2_vl, bf16), lora_model(tiny_qwen2_vl, bf16)
    lora_layers = [m for m in converted.modules() if hasattr(m, "lora_A")]

    weights = sum(p.numel() for p in converted.parameters())
    count = convert_lora_base_layers_to_fp8(converted)

    aligned = [m for m in lora_layers if m.in_features % 16 == 0 and m.out_features % 16 == 0]
    assert count == len(aligned) == fp8_layer_count(converted) > 0
    # the converted weights left the parameters for buffers; together they are what they were
    assert sum(p.numel() for p in converted.parameters()) + fp8_weight_count(converted) == weights
    batch = sft_collator(tiny_qwen2_vl, bf16)(two_sft_examples())
    ref_loss, ref_grads = loss_and_lora_grads(reference, batch)
    loss, grads = loss_and_lora_grads(converted, batch)

    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 0.02 * ref_loss.item()
    assert grads.keys() == ref_grads.keys() and all("lora_" in n for n in grads)
    flat = torch.cat([grads[n].flatten() for n in sorted(grads)])
    ref_flat = torch.cat([ref_grads[n].flatten() for n in sorted(grads)])
    assert cosine(flat, ref_flat) > 0.98


def test_layers_that_cannot_run_in_float8_stay_and_a_warning_says_why(caplog):
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential()
    model.add_module("aligned", torch.nn.Linear(32, 16))
    model.add_module("odd", torch.nn.Linear(16, 10))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["aligned", "odd"]))

    with caplog.at_level(logging.WARNING, logger="vlm_ray.models.fp8_frozen_linear"):
        assert convert_lora_base_layers_to_fp8(model) == 1

    assert "16x10 is not a multiple of 16" in caplog.text
    assert isinstance(model.base_model.model.aligned.base_layer, Float8FrozenLinear)
    assert type(model.base_model.model.odd.base_layer) is torch.nn.Linear


def test_a_merged_save_gets_the_original_weights_back_only_when_they_were_kept(
    tiny_qwen2_vl: Path, lora_model
):
    bf16 = torch.bfloat16
    kept, dropped = lora_model(tiny_qwen2_vl, bf16), lora_model(tiny_qwen2_vl, bf16)
    originals = {n: p.detach().clone() for n, p in kept.named_parameters() if "base_layer" in n}
    converted = convert_lora_base_layers_to_fp8(kept, keep_bf16_on_host=True)
    convert_lora_base_layers_to_fp8(dropped)

    assert restore_bf16_base_layers(kept) == converted
    restored = {n: p for n, p in kept.named_parameters() if "base_layer" in n}
    assert restored.keys() == originals.keys()
    assert all(torch.equal(restored[n], originals[n]) for n in originals)
    assert fp8_layer_count(kept) == 0
    with pytest.raises(ValueError, match=r"train\.fp8: .* kept no bf16 copy"):
        restore_bf16_base_layers(dropped)


def _spec(**sections) -> dict:
    return {
        "model": {"name": "m", **sections.get("model", {})},
        "data": {"source": "/tmp/x"},
        "train": {"fp8": True},
    }


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ({"load_in_4bit": True}, "model.load_in_4bit"),
        ({"load_in_8bit": True}, "model.load_in_8bit"),
        ({"full_finetuning": True}, "model.full_finetuning"),
    ],
)
def test_the_spec_refuses_fp8_without_a_16bit_lora_base(model: dict, named: str):
    with pytest.raises(Exception, match=rf"train\.fp8.*{named}"):
        parse_spec(_spec(model=model))


def test_the_train_stage_on_a_machine_without_a_float8_gpu_names_the_setting(
    logged_training_run, tiny_qwen2_vl: Path
):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU; the GPU test covers the stage there")
    with pytest.raises(ValueError, match=r"train\.fp8 needs a CUDA GPU"):
        logged_training_run(tiny_qwen2_vl, "fp8", rows=2, train={"fp8": True, "max_steps": 1})


def test_the_merged_model_saved_after_fp8_training_is_merged_into_the_original_weights(
    tiny_qwen2_vl: Path, lora_model, tiny_train_spec, tmp_path: Path
):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_ray import layout
    from vlm_ray.storage import LocalStore
    from vlm_ray.train.hf_engine import save_hf_model

    bf16 = torch.bfloat16
    trained, reference = lora_model(tiny_qwen2_vl, bf16), lora_model(tiny_qwen2_vl, bf16)
    for model in (trained, reference):  # the same non-zero adapter, as if trained
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    convert_lora_base_layers_to_fp8(trained, keep_bf16_on_host=True)
    spec = tiny_train_spec(
        tiny_qwen2_vl, tmp_path / "run", train={"fp8": True}, save={"merged_16bit": True}
    )
    store = LocalStore(tmp_path / "run")

    out = save_hf_model(
        spec, store, tmp_path / "work", trained, AutoProcessor.from_pretrained(tiny_qwen2_vl)
    )

    assert out["merged_uri"] == store.uri_of(layout.MERGED)
    merged = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "run" / layout.MERGED, dtype=torch.bfloat16
    ).state_dict()
    expected = reference.merge_and_unload().to(torch.bfloat16).state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_layers_narrower_than_the_minimum_width_stay_bf16_and_the_warning_names_the_setting(
    caplog,
):
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential()
    model.add_module("wide", torch.nn.Linear(64, 64))
    model.add_module("narrow_out", torch.nn.Linear(64, 32))
    model.add_module("narrow_in", torch.nn.Linear(32, 64))
    targets = ["wide", "narrow_out", "narrow_in"]
    model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))

    with caplog.at_level(logging.WARNING, logger="vlm_ray.models.fp8_frozen_linear"):
        assert convert_lora_base_layers_to_fp8(model, min_features=64) == 1

    assert "64x32 (effective width 43) is narrower than train.fp8_min_features=64" in caplog.text
    assert "32x64 (effective width 43) is narrower than train.fp8_min_features=64" in caplog.text
    layers = model.base_model.model
    assert isinstance(layers.wide.base_layer, Float8FrozenLinear)
    assert type(layers.narrow_out.base_layer) is torch.nn.Linear
    assert type(layers.narrow_in.base_layer) is torch.nn.Linear


def test_the_spec_keeps_layers_narrower_than_2560_in_bf16_unless_told_otherwise():
    from vlm_ray.config import TrainSpec

    assert TrainSpec().fp8_min_features == 2560
    assert TrainSpec(fp8_min_features=16).fp8_min_features == 16
    with pytest.raises(ValueError, match="fp8_min_features"):
        TrainSpec(fp8_min_features=8)


def test_the_default_width_puts_exactly_the_7b_layers_that_gained_in_float8():
    """Run 21's GEMM table (docs/benchmarks.md): float8 gained on the language q/o and MLP
    layers and lost on k/v and the vision tower's layers taken together."""
    from vlm_ray.config import TrainSpec
    from vlm_ray.models.fp8_frozen_linear import effective_width

    gained = {"q/o": (3584, 3584), "gate/up": (3584, 18944), "down": (18944, 3584)}
    # k/v lost alone; the vision tower's layers lost taken together (proj more than the rest gained)
    kept_bf16 = {
        "k/v": (3584, 512),
        "vision qkv": (1280, 3840),
        "vision proj": (1280, 1280),
        "vision fc1": (1280, 5120),
        "vision fc2": (5120, 1280),
    }
    threshold = TrainSpec().fp8_min_features
    assert all(effective_width(*shape) >= threshold for shape in gained.values())
    assert all(effective_width(*shape) < threshold for shape in kept_bf16.values())
    assert effective_width(1280, 1280) == 1280  # a square layer's width is its width
